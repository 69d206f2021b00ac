"""Fixtures of the workflow tests: one small local run of the workflow, shared by the tests that need its
tables, figures and report (test_report.py) or compare another run with it (test_slurm.py)."""
import os
import shutil
import subprocess

import pytest
import yaml
from test_workflow import ROOT, SNAKEMAKE, _write_tiny_cohort


def write_small_cohort(root, small_subject):
    """test_workflow's tiny cohort cut down to the quality and segmentation tables, the figures and the report
    in about a minute on 2 cores: the subject with ground truth only (no acquired subject), and two methods
    (gsvr with one SVR cycle, stack_average) plus the uninstalled tool the tables list as such."""
    _write_tiny_cohort(root, small_subject)
    path = root / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    methods = config["methods"]
    svr = {"spacings_mm": [3.2], "stack_spacings_mm": [], "translation_only_cycles": 1, "cg_iterations": 6, "reg_steps": 4}
    gsvr = {**methods["gsvr"], "align": None, "svr": svr}
    config.update(acquired=None, assess_methods=[],
                  methods={"gsvr": gsvr, "stack_average": methods["stack_average"], "nesvor": methods["nesvor"]})
    path.write_text(yaml.safe_dump(config))


def snakemake(*args, cwd=ROOT, env=None, timeout=900):
    return subprocess.run([SNAKEMAKE, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, small_subject):
    """A finished local run of the small cohort: its working directory. Two jobs at a time, one thread each
    (test_slurm.py runs its jobs with one thread too: equal threads give equal numbers)."""
    root = tmp_path_factory.mktemp("small_run")
    write_small_cohort(root, small_subject)
    res = snakemake("-s", ROOT / "Snakefile", "--directory", root, "--cores", "2", "--max-threads", "1")
    assert res.returncode == 0, res.stderr[-4000:]
    return root


@pytest.fixture(scope="session")
def small_report(small_run):
    """report.html of the small run, as the README makes it (`snakemake --report report.html`)."""
    res = snakemake("-s", ROOT / "Snakefile", "--report", "report.html", cwd=small_run)
    assert res.returncode == 0, res.stderr[-4000:]
    return small_run / "report.html"


@pytest.fixture(scope="session")
def small_cohort(small_subject):
    """write_small_cohort(root) for a test's own run of the small cohort."""
    return lambda root: write_small_cohort(root, small_subject)


@pytest.fixture(scope="session")
def chromium():
    """Headless Chromium: installed (Debian package chromium) where missing and we are root."""
    def find():
        return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)

    if find() is None and not apt_install("chromium", "fonts-liberation"):
        pytest.skip("needs Chromium (Debian: apt-get install chromium, as root; .ci/run installs it)")
    return find()


def apt_install(*packages):
    """Install Debian packages where they are missing and we may (root with apt-get); False where we may not."""
    if not shutil.which("dpkg-query"):
        return False
    missing = [p for p in packages if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                                     text=True).stdout != "install ok installed"]
    if not missing:
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"apt-get install {' '.join(missing)} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
    return True
