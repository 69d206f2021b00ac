import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")


def _snakemake(*args, cwd=ROOT):
    return subprocess.run([SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True)


def test_dry_run_of_the_default_config_plans_every_method():
    res = _snakemake("-n", "--cores", "1", "--nolock", "--forceall")
    assert res.returncode == 0, res.stderr + res.stdout
    out = res.stdout
    assert "reconstruct" in out and "evaluate" in out and "aggregate" in out


def test_config_with_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "config" / "config.yaml").read_text() + "\nunknown_knob: 1\n")
    res = _snakemake("-n", "--cores", "1", "--nolock", "--configfile", str(bad))
    assert res.returncode != 0
    assert "unknown_knob" in res.stderr + res.stdout
