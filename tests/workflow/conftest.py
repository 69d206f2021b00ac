"""Fixtures of the workflow tests: one tiny local run of the whole workflow, shared by the test of its tables
(test_workflow.py), the tests of its report (test_report.py) and the SLURM test that repeats part of it
(test_slurm.py)."""
import os
import shutil
import subprocess

import pytest
import yaml
from test_workflow import ROOT, SNAKEMAKE

#: the methods of the SLURM test's run: gsvr, the floor, and an uninstalled tool the tables list as such
SLURM_METHODS = ("gsvr", "stack_average", "nesvor")


def write_tiny_cohort(root, small_subject):
    """A 1.6 mm subject with ground truth and labels, an 'acquired' subject of simulated stacks, and a
    config with tiny methods (seconds each) and a coarse segmentation."""
    import nibabel as nib
    import numpy as np
    import pandas as pd
    import yaml

    from gsvr.simulate.stacks import SimulationConfig, simulate_stacks

    vol, mask, affine = small_subject
    data = root / "data"
    data.mkdir()
    labels = nib.load(ROOT / "data/demo/GA23/parcellation.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(labels.dataobj)[::2, ::2, ::2].astype("int16"), affine), data / "gt_labels.nii.gz")
    nib.save(nib.Nifti1Image(vol, affine), data / "gt.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype("uint8"), affine), data / "gt_mask.nii.gz")
    sim_cfg = dict(n_stacks=3, inplane_spacing_mm=1.6, thickness_mm=4.0, obliquity_deg=5.0, motion_rotation_deg=3.0,
                   motion_translation_mm=2.0, noise_level=0.01, fov_margin_mm=4.0, through_plane_samples=11, seed=2)
    acq = simulate_stacks(vol, mask, affine, SimulationConfig(**{**sim_cfg, "seed": 7}))
    names = ["ax", "cor", "sag"]
    for name, s in zip(names, acq.stacks):
        nib.save(nib.Nifti1Image(s.data, s.affine), data / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image((s.mask > 0).astype("uint8"), s.affine), data / f"{name}_mask.nii.gz")
    cfg_dir = root / "config"
    cfg_dir.mkdir()
    pd.DataFrame([{"subject": "tiny", "dataset": "test", "volume": "../data/gt.nii.gz", "mask": "../data/gt_mask.nii.gz",
                   "labels": "../data/gt_labels.nii.gz"}]).to_csv(
        cfg_dir / "subjects.tsv", sep="\t", index=False)
    pd.DataFrame([{"subject": "acq", "dataset": "test", "stacks": " ".join(f"../data/{n}.nii.gz" for n in names),
                   "masks": " ".join(f"../data/{n}_mask.nii.gz" for n in names), "thicknesses": "4 4 4"}]).to_csv(
        cfg_dir / "acquired.tsv", sep="\t", index=False)
    fast = {"init": {"n_gaussians": 4000}, "model": {"k_neighbors": 16}, "output": {"resolution_mm": 1.6},
            "run": {"seed": 0}, "svr": {"spacings_mm": [3.2, 3.2, 2.4], "stack_spacings_mm": [3.2]}, "fit": {"steps": 30}}
    config = {
        "subjects": "config/subjects.tsv", "acquired": "config/acquired.tsv", "assess_methods": ["svr_classic"],
        "simulation": sim_cfg, "preprocess": {"crop_margin_mm": 8.0, "n4": False, "standardise": True},
        "segmentation": {"atlases": [str(ROOT / "data/atlases/GA22"), str(ROOT / "data/atlases/GA24")],
                         "registration_spacing_mm": 3.2},
        "methods": {"gsvr": fast, "svr_classic": {**fast, "engine": "svr_classic"},
                    "stack_average": {"engine": "stack_average", "output": {"resolution_mm": 1.6}},
                    "nesvor": {"engine": "nesvor", "command": ["gsvr-test-no-such-program"]}},
    }
    (cfg_dir / "config.yaml").write_text(yaml.safe_dump(config))



def write_slurm_cohort(root, small_subject):
    """The tiny cohort cut down to what the SLURM test runs: the subject with ground truth and the methods of
    SLURM_METHODS, each with the tiny run's settings (so their rows equal the tiny run's)."""
    write_tiny_cohort(root, small_subject)
    path = root / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config.update(acquired=None, assess_methods=[], methods={m: config["methods"][m] for m in SLURM_METHODS})
    path.write_text(yaml.safe_dump(config))


def snakemake(*args, cwd=ROOT, env=None, timeout=900):
    return subprocess.run([SNAKEMAKE, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, small_subject):
    """A finished local run of the tiny cohort: its working directory. Two jobs at a time, one thread each
    (test_slurm.py runs its jobs with one thread too: equal threads give equal numbers)."""
    root = tmp_path_factory.mktemp("small_run")
    write_tiny_cohort(root, small_subject)
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
def slurm_cohort(small_subject):
    """write_slurm_cohort(root) for the SLURM test's own run."""
    return lambda root: write_slurm_cohort(root, small_subject)


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
