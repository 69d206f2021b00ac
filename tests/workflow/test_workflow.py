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


def test_slurm_profile_plans_the_reconstructions_with_one_gpu():
    res = _snakemake("-n", "--nolock", "--forceall", "--profile", "workflow/profiles/slurm")
    assert res.returncode == 0, res.stderr + res.stdout
    blocks = res.stdout.split("\nrule ")
    recon = [b for b in blocks if b.startswith("reconstruct:")]
    others = [b for b in blocks if b.startswith(("evaluate:", "aggregate:"))]
    assert recon and others
    assert all("gpu=1" in b for b in recon)
    assert not any("gpu=1" in b for b in others)


def test_ablation_config_plans_every_row_of_gsvr_table_2():
    res = _snakemake("-n", "--cores", "1", "--nolock", "--forceall", "--configfile", "config/ablation_gsvr.yaml")
    assert res.returncode == 0, res.stderr + res.stdout
    for method in ("gsvr_N10k", "gsvr_N80k", "gsvr_K10", "gsvr_K80", "gsvr_noAdaptiveInit", "gsvr_joint_noPSF", "gsvr_joint_noReg"):
        assert f"method={method}" in res.stdout, method

