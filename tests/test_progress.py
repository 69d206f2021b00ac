"""Progress reports (gsvr.progress): a bar on a terminal, a few log lines elsewhere."""

import io
import logging
import re

import nibabel as nib
import numpy as np
import pytest

from gsvr import progress
from gsvr.cli import main


class _Terminal(io.StringIO):
    def isatty(self):
        return True


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("setting, terminal, mode", [(True, False, "log"), (True, True, "bar"), ("auto", True, "bar"),
                                                     (False, True, "off"), ("off", False, "off"), ("log", True, "log"),
                                                     ("bar", False, "bar")])
def test_a_bar_only_on_a_terminal_unless_asked(monkeypatch, setting, terminal, mode):
    monkeypatch.setattr("sys.stderr", _Terminal() if terminal else io.StringIO())
    assert progress.progress_mode(setting) == mode


def test_an_unknown_progress_setting_is_an_error():
    with pytest.raises(ValueError, match="progress must be"):
        progress.progress_mode("loud")


def test_log_progress_writes_a_line_every_ten_seconds_with_the_steps_own_postfix(monkeypatch, caplog):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    caplog.set_level(logging.INFO, logger="gsvr.progress")
    with progress.progress_bar(800, desc="gsvr", progress="log") as bar:
        for step in range(800):
            clock.now += 0.125  # 100 s in all
            bar.update(1)
            bar.set_postfix_str(f"step {step + 1}")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10  # one every 10 s, the last one when it ends
    assert lines[0] == "progress: 80/800 it (10%) after 10 s, step 80"
    assert lines[-1] == "progress: 800/800 it, done in 100.0 s"


def test_log_progress_off_or_interrupted_says_nothing_more(monkeypatch, caplog):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    caplog.set_level(logging.INFO, logger="gsvr.progress")
    bar = progress.progress_bar(10, desc="gsvr", progress=False)
    clock.now = 60.0
    bar.update(10)
    bar.set_postfix(loss=0.5)
    bar.close()
    with pytest.raises(KeyboardInterrupt), progress.progress_bar(10, desc="svr", unit="cycle", progress="log") as bar:
        raise KeyboardInterrupt
    assert caplog.records == []


def test_a_reconstruction_logged_to_a_file_has_no_carriage_returns_and_a_line_per_stage(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    stacks = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    for k, s in enumerate(stacks):
        nib.save(nib.Nifti1Image(np.random.default_rng(k).random((12, 12, 6)).astype(np.float32) + 1,
                 np.diag([1.0, 1.0, 3.0, 1.0])), s)
    (tmp_path / "cfg.yaml").write_text("init: {n_gaussians: 200}\nsvr: {spacings_mm: [3.0], stack_spacings_mm: []}\n"
                                       "fit: {steps: 3}\nalign: null\noutput: {resolution_mm: 2.0}\n")
    code = main(["reconstruct", "--input-stacks", *map(str, stacks), "--config", str(tmp_path / "cfg.yaml"),
                 "--output-volume", str(tmp_path / "o.nii.gz")])  # progress on; stderr is not a terminal here
    err, logged = capsys.readouterr().err, "\n".join(r.getMessage() for r in caplog.records)
    assert code == 0 and "\r" not in err and "it/s" not in err  # no bar
    from gsvr.recon.stages import PIPELINE

    for stage, _ in PIPELINE:
        assert f"stage {stage.NAME} done in" in logged, stage.NAME
    # 1 SVR cycle, 3 fit steps, the refinement's steps (its split's 3 fit steps and those it ran): the bar ends full
    done = re.search(r"progress: (\d+)/(\d+) it, done in", logged)
    assert done and done[1] == done[2] and int(done[1]) >= 1 + 3 + 3, logged
