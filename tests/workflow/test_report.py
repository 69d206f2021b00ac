"""report.html as a person sees it: the small run's report opened in headless Chromium, clicked through (results,
tables, a table's caption, figures) and photographed.

Snakemake's report is a React app with the results embedded as data URIs. What renders: the menu of result
categories; per category a list of files, each with a view button and an info button (caption, rule, size);
an image's view button shows the image; a CSV's view button is a download of the file (the report does not lay
tables out). The test drives the page with a script added to a copy of the report: it clicks links by their
text or a file's button, and after each click records the page's text and what it shows in a body attribute,
which --dump-dom returns.
"""
import base64
import html
import json
import subprocess
import warnings
from html.parser import HTMLParser
from urllib.parse import unquote_to_bytes

import numpy as np
import pytest

TABLES = ("results/tables/per_subject.csv", "results/tables/segmentation_per_subject.csv")
FIGURES = ("results/figures/tiny_triplanar.png", "results/figures/tiny_convergence.png")
WINDOW = (1280, 900)
# Clicks in order: a link by its text, or a file row's button (eye: view, information-circle: info).
STEPS = [{"text": "Tables"},
         {"row": TABLES[0], "icon": "information-circle"},
         {"text": "Tables"},
         {"row": TABLES[1], "icon": "information-circle"},
         {"text": "Results"},
         {"text": "Figures"},
         {"row": FIGURES[1], "icon": "eye"},
         {"row": FIGURES[0], "icon": "eye"}]  # the last view is the screenshot's
DRIVER = """<script data-steps="{steps}">
(function () {{
  // Added by tests/workflow/test_report.py: click through the report and record each view in <body data-views>.
  var steps = JSON.parse(document.currentScript.dataset.steps), views = [];
  function target(step) {{
    if (step.row) {{
      var row = Array.from(document.querySelectorAll("#app tr")).find(function (r) {{
        return r.cells.length > 0 && r.cells[0].textContent.trim() === step.row; }});
      return row && row.querySelector('a[iconname="' + step.icon + '"]');
    }}
    return Array.from(document.querySelectorAll("#app a")).find(function (a) {{ return a.textContent.trim() === step.text; }});
  }}
  function record(step, found) {{
    var app = document.getElementById("app");
    views.push({{step: step, found: found, text: app ? app.innerText : "",
      downloads: Array.from(document.querySelectorAll('#app a[download]')).map(function (a) {{ return [a.download, a.href]; }}),
      images: Array.from(document.querySelectorAll("#app img")).filter(function (i) {{ return i.src.indexOf("data:image/png") === 0; }})
        .map(function (i) {{ var r = i.getBoundingClientRect();
          return {{src: i.src, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
                  box: [Math.round(r.left), Math.round(r.top), Math.round(r.right), Math.round(r.bottom)]}}; }})}});
    document.body.setAttribute("data-views", JSON.stringify(views));
  }}
  function run(i) {{
    if (i === steps.length) return;
    var a = target(steps[i]);
    if (a) a.click();
    setTimeout(function () {{ record(steps[i], !!a); run(i + 1); }}, 500);
  }}
  window.addEventListener("load", function () {{ setTimeout(function () {{ record({{start: true}}, true); run(0); }}, 500); }});
}})();
</script>
"""


@pytest.fixture(scope="session")
def driven_report(small_report, small_run, chromium, tmp_path_factory):
    """The report with the driver added, its DOM after the clicks (the recorded views) and a screenshot of the
    last view.

    Headless Chromium takes the screenshot when its virtual-time budget runs out; on a loaded machine the image
    can still be undecoded then, and the page is photographed with a blank where the figure goes (seen once in
    CI: mean difference 87.5, the region white). So the page is loaded again, up to three times, until the
    screenshot shows the figure; a report that never draws it fails every load."""
    text = small_report.read_text()
    end = text.rindex("</body>")
    for attempt in range(3):
        out = tmp_path_factory.mktemp("report_view")
        page = out / "driven.html"
        page.write_text(text[:end] + DRIVER.format(steps=html.escape(json.dumps(STEPS))) + text[end:])
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={out / 'profile'}",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--virtual-time-budget={3000 + 600 * len(STEPS)}"]
        # One page load for both: the DOM after the clicks (stdout) and the screenshot of the last view.
        res = subprocess.run([*args, "--dump-dom", f"--screenshot={out / 'shot.png'}", page.as_uri()], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0 and (out / "shot.png").is_file(), res.stderr[-2000:]
        views = _views(res.stdout)
        difference = _figure_difference(views, out / "shot.png", small_run)[0]
        if difference < 4:
            break
        warnings.warn(f"report screenshot {attempt + 1} did not show the figure (mean difference {difference:.1f}); loading again")
    return views, out / "shot.png"


class _BodyViews(HTMLParser):
    views = None

    def handle_starttag(self, tag, attrs):
        if tag == "body":
            self.views = json.loads(dict(attrs).get("data-views") or "[]")


def _views(dom):
    parser = _BodyViews()
    parser.feed(dom)
    assert parser.views, "the report's page never finished loading (no view recorded)"
    return parser.views


def _data(uri):
    head, _, payload = uri.partition(",")
    return base64.b64decode(payload) if head.endswith(";base64") else unquote_to_bytes(payload)


def _view(views, **step):
    matches = [v for v in views if v["step"] == step]
    assert matches and all(v["found"] for v in matches), f"nothing to click for {step}: the page showed\n{views[-1]['text'][:1500]}"
    return matches[-1]


@pytest.mark.slow
def test_the_report_shows_the_menu_the_workflow_description_and_both_tables_with_the_runs_data(driven_report, small_run):
    views, _ = driven_report
    start = views[0]["text"]
    assert "snakemake" in start.lower() and "results" in start.lower(), start[:1500]  # innerText: as shown (some in capitals)
    assert "gsvr workflow: per subject" in start and "'thickness_mm': 4.0" in start  # workflow.rst with the config filled in
    tables = _view(views, text="Tables")
    for path in TABLES:
        assert path in tables["text"]
    downloads = dict(tables["downloads"])
    # What a person downloads from the report is the run's table, byte for byte.
    for path in TABLES:
        assert _data(downloads[path.rsplit("/", 1)[1]]) == (small_run / path).read_bytes(), path
    quality = _data(downloads["per_subject.csv"]).decode()
    assert "tiny,gsvr," in quality and "tiny,stack_average," in quality
    assert "ground_truth" in _data(downloads["segmentation_per_subject.csv"]).decode()
    # Each table's caption (workflow/report/*.rst) renders in its info view.
    info = _view(views, row=TABLES[0], icon="information-circle")["text"]
    assert "PSNR, SSIM, NCC, NRMSE" in info and "reconstruct" in info, info[:1500]
    info = _view(views, row=TABLES[1], icon="information-circle")["text"]
    assert "Dice, HD95 (mm) and ASSD (mm)" in info, info[:1500]


@pytest.mark.slow
def test_the_reports_figures_render_as_the_runs_images(driven_report, small_run):
    from PIL import Image

    views, _ = driven_report
    figures = _view(views, text="Figures")
    for path in FIGURES:
        assert path in figures["text"]
    for path in FIGURES:
        shown = _view(views, row=path, icon="eye")["images"]
        assert len(shown) == 1, f"{path}: {len(shown)} images shown"
        image = shown[0]
        with Image.open(small_run / path) as png:
            size = png.size
        assert _data(image["src"]) == (small_run / path).read_bytes(), path
        # Decoded by the browser at the file's size (a broken image has natural size 0 x 0).
        assert image["complete"] and (image["width"], image["height"]) == size, (path, image["width"], image["height"], size)


@pytest.mark.slow
def test_a_screenshot_of_the_report_shows_the_figure_not_a_blank_page(driven_report, small_run):
    from PIL import Image

    views, shot = driven_report
    assert shot.stat().st_size > 20_000  # a blank page compresses to a few kB
    with Image.open(shot) as png:
        assert png.size == WINDOW
        page = png.convert("L")
    # The menu (left) and the rest of the page carry structure, not one colour.
    pixels = np.asarray(page, dtype=np.float64)
    assert pixels[:, : WINDOW[0] // 5].std() > 10 and pixels.std() > 20
    difference, box = _figure_difference(views, shot, small_run)
    left, top, right, bottom = box
    assert right - left > WINDOW[0] // 3 and bottom - top > WINDOW[1] // 3, box
    assert difference < 4, difference  # 1.8 when drawn; 5.7 two pixels off


def _figure_difference(views, shot, run):
    """Mean absolute grey-level difference between the last view's figure, at the size the page drew it (scaled
    to fit the window), and the screenshot where the two match best (the page lays the figure out again for the
    screenshot's viewport, so its position is searched, not assumed); and the figure's box on the page."""
    from PIL import Image

    box = views[-1]["images"][0]["box"] if views[-1]["images"] else (0, 0, 0, 0)
    left, top, right, bottom = box
    if right - left < 2 or bottom - top < 2:
        return np.inf, box
    with Image.open(shot) as png:
        pixels = np.asarray(png.convert("L"), dtype=np.float64)
    with Image.open(run / FIGURES[0]) as fig:
        figure = np.asarray(fig.convert("L").resize((right - left, bottom - top), Image.BILINEAR), dtype=np.float64)
    row, col = _best_match(pixels, figure)
    shown = pixels[row:row + figure.shape[0], col:col + figure.shape[1]]
    return (np.abs(shown - figure).mean() if shown.shape == figure.shape else np.inf), box


def _best_match(image, template):
    """(row, col) of template's top-left corner in image at the peak of their cross-correlation."""
    spectrum = np.fft.rfft2(image - image.mean()) * np.conj(np.fft.rfft2(template - template.mean(), s=image.shape))
    return np.unravel_index(np.argmax(np.fft.irfft2(spectrum, s=image.shape)), image.shape)
