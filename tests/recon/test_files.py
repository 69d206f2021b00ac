"""Methods on files (gsvr.recon.files): settings checks, dispatch between gsvr's engines and external
tools, and the outputs each writes. No real reconstruction: stack_average and a fake external tool."""

import json
import sys
import textwrap

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from gsvr.baselines.external import ExternalSettings
from gsvr.errors import GsvrError
from gsvr.recon.config import ReconConfig
from gsvr.recon.engine import HISTORY_COLUMNS
from gsvr.recon.files import METHODS, assess_method_files, run_method_files
from gsvr.recon.plan import (ENGINES, MEMORY_MIN_MB, auto_means_cuda, check_method_settings, check_methods, memory_mb, runtime_min,
                             stack_voxels, uses_cuda)


def _write_stacks(folder, n=3, names=None):
    """``n`` small stacks (a blob, 2 x 2 x 4 mm) with their masks, named as the workflow's preprocessed folder."""
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.indices((20, 20, 8)).astype(np.float32)
    centre = np.array([9.5, 9.5, 3.5])[:, None, None, None]
    scale = np.array([6.0, 6.0, 3.0])[:, None, None, None]
    blob = np.exp(-(((grid - centre) / scale) ** 2).sum(0)).astype(np.float32)
    stacks, masks = [], []
    for k in range(n):
        affine = np.diag([2.0, 2.0, 4.0, 1.0])
        affine[:3, 3] = -np.array([19.0, 19.0, 14.0]) + 0.5 * k
        name = names[k] if names else f"stack{k}"
        stacks.append(str(folder / f"{name}.nii.gz"))
        masks.append(str(folder / f"{name}_mask.nii.gz"))
        nib.save(nib.Nifti1Image(blob, affine), stacks[-1])
        nib.save(nib.Nifti1Image((blob > 0.2).astype(np.uint8), affine), masks[-1])
    return stacks, masks


def _fake_tool(tmp_path):
    """A program standing in for NeSVoR: records its arguments, writes a volume where asked."""
    script = tmp_path / "fake_nesvor.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        import nibabel as nib, numpy as np
        args = sys.argv[1:]
        out = args[args.index("--output-volume") + 1]
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), out)
        open(sys.argv[0] + ".args.json", "w").write(json.dumps(args))
    """))
    return {"engine": "nesvor", "command": [sys.executable, str(script)]}, script


def _outputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return dict(output_volume=str(out / "volume.nii.gz"), output_slices_tsv=str(out / "slices.tsv"),
                output_log=str(out / "iterations.tsv"))


def test_settings_without_engine_are_gsvrs_and_an_external_tool_gets_its_own():
    engine, parsed = check_method_settings({}, "config methods.gsvr")
    assert engine == "gsvr" and parsed == ReconConfig.from_dict({})
    engine, parsed = check_method_settings({"engine": "stack_average"}, "config methods.floor")
    assert engine == "stack_average" and isinstance(parsed, ReconConfig)
    engine, parsed = check_method_settings({"engine": "svrtk", "command": ["mirtk"]}, "config methods.svrtk")
    assert engine == "svrtk" and parsed == ExternalSettings(tool="svrtk", command=("mirtk",))


@pytest.mark.parametrize("settings,word", [({"no_such_knob": 1}, "no_such_knob"),
                                           ({"engine": "svr_classic", "no_such_knob": 1}, "no_such_knob"),
                                           ({"engine": "nesvor", "comand": ["x"]}, "comand"),
                                           ({"engine": "nesvorr"}, "nesvorr")])
def test_a_bad_setting_or_engine_is_an_error_naming_the_method(settings, word):
    with pytest.raises(GsvrError, match=r"^config methods\.typo: ") as err:
        check_method_settings(settings, "config methods.typo")
    assert word in str(err.value)


def test_a_check_made_after_parsing_is_given_the_methods_name(monkeypatch):
    def refuse(values, *, source="config"):
        raise GsvrError("config: some.setting must be > 0, got 0")

    monkeypatch.setattr(ReconConfig, "from_dict", staticmethod(refuse))
    with pytest.raises(GsvrError, match=r"^config methods\.x: some\.setting must be > 0"):
        check_method_settings({}, "config methods.x")


def test_check_methods_reports_every_bad_method_at_once():
    methods = {"good": {}, "bad1": {"no_such_knob": 1}, "ext": {"engine": "niftymic"}, "bad2": {"engine": "nope"}}
    with pytest.raises(GsvrError) as err:
        check_methods(methods)
    lines = str(err.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["config methods.bad1", "config methods.bad2"]
    checked = check_methods({"good": {}, "ext": {"engine": "niftymic"}})
    assert checked["good"][0] == "gsvr" and checked["ext"][0] == "niftymic"


def test_stack_average_on_files_writes_the_volume_slice_table_and_log(tmp_path):
    stacks, masks = _write_stacks(tmp_path / "in")
    out = _outputs(tmp_path)
    result = run_method_files({"engine": "stack_average"}, stacks, masks, [4.0] * 3, source="config methods.sa", **out)
    assert result is not None and np.isfinite(nib.load(out["output_volume"]).get_fdata()).all()
    slices = pd.read_csv(out["output_slices_tsv"], sep="\t")
    assert len(slices) == 3 * 8 and list(pd.read_csv(out["output_log"], sep="\t").columns) == HISTORY_COLUMNS


def test_an_external_tool_on_a_folder_of_stacks_writes_its_volume_and_header_only_tables(tmp_path):
    stacks, masks = _write_stacks(tmp_path / "pre_acquired")
    settings, script = _fake_tool(tmp_path)
    out = _outputs(tmp_path)
    assert run_method_files(settings, str(tmp_path / "pre_acquired"), None, [4.0] * 3, **out) is None
    args = pd.read_json(str(script) + ".args.json", typ="series").tolist()
    assert args[args.index("--input-stacks") + 1:][:3] == stacks
    assert args[args.index("--stack-masks") + 1:][:3] == masks
    assert nib.load(out["output_volume"]).shape == (4, 4, 4)
    slices, log = (pd.read_csv(out[k], sep="\t") for k in ("output_slices_tsv", "output_log"))
    assert slices.empty and list(slices.columns) == ["stack", "slice_index"]
    assert log.empty and list(log.columns) == HISTORY_COLUMNS


def test_an_external_tool_that_is_not_installed_fails_before_writing_anything(tmp_path):
    stacks, masks = _write_stacks(tmp_path / "in")
    out = _outputs(tmp_path)
    with pytest.raises(GsvrError, match="not installed"):
        run_method_files({"engine": "nesvor", "command": ["gsvr-test-no-such-program"]}, stacks, masks, None, **out)
    assert not any((tmp_path / "out").iterdir())


def test_a_folder_of_stacks_takes_no_separate_masks_and_assessment_refuses_external_tools(tmp_path):
    stacks, masks = _write_stacks(tmp_path / "pre_acquired")
    with pytest.raises(GsvrError, match="holds their masks"):
        run_method_files({}, str(tmp_path / "pre_acquired"), masks, None, **_outputs(tmp_path))
    with pytest.raises(GsvrError, match=r"^config methods\.n: .*gsvr's own methods"):
        assess_method_files({"engine": "nesvor"}, stacks, masks, None, output_tsv=str(tmp_path / "a.tsv"),
                            source="config methods.n")


@pytest.mark.parametrize("settings, auto_cuda, cuda", [
    ({"run": {"device": "cpu"}}, True, False), ({"run": {"device": "cuda"}}, False, True),
    ({}, True, True), ({}, False, False),
    ({"engine": "svr_classic", "run": {"device": "cuda"}}, False, True), ({"engine": "svr_classic"}, True, True),
    ({"engine": "stack_average", "run": {"device": "cuda"}}, True, False),
    ({"engine": "nesvor"}, False, True), ({"engine": "svrtk"}, True, False), ({"engine": "niftymic"}, True, False)])
def test_a_method_uses_cuda_when_its_device_says_so_and_its_engine_can(settings, auto_cuda, cuda):
    assert uses_cuda(*check_method_settings(settings, "m"), cuda_available=auto_cuda) is cuda


def test_auto_device_is_cuda_cpu_or_what_torch_detects(monkeypatch, tmp_path):
    import torch

    from gsvr.recon import plan

    assert auto_means_cuda("cuda") and not auto_means_cuda("cpu")
    node = tmp_path / "nvidiactl"
    node.touch()
    monkeypatch.setattr(plan, "GPU_DEVICE_NODES", (str(tmp_path / "absent"), str(node)))  # a driver is here: ask torch
    for seen in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: seen)
        assert auto_means_cuda("detect") is seen
    with pytest.raises(GsvrError, match="auto_device"):
        auto_means_cuda("gpu")


def test_without_a_gpu_driver_detect_says_cpu_without_asking_torch(monkeypatch, tmp_path):
    import torch

    from gsvr.recon import plan

    def ask():
        raise AssertionError("torch was asked")

    monkeypatch.setattr(plan, "GPU_DEVICE_NODES", (str(tmp_path / "nvidiactl"),))
    monkeypatch.setattr(torch.cuda, "is_available", ask)
    monkeypatch.setattr(sys, "platform", "linux")
    assert auto_means_cuda("detect") is False


def test_the_workflow_plans_without_importing_torch_and_runs_every_engine_it_plans():
    """Snakemake imports gsvr.recon.plan on every parse (each dry run, twice per SLURM job): torch costs seconds."""
    import subprocess

    code = ("import sys, gsvr.recon.plan, gsvr.baselines.external; "
            "print(sorted(m for m in ('torch', 'gsvr.recon.engine') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
    assert tuple(METHODS) == ENGINES


def test_memory_and_runtime_requests_follow_the_measured_figures(tmp_path):
    stacks, _ = _write_stacks(tmp_path / "pre_acquired")
    assert stack_voxels(stacks) == stack_voxels(str(tmp_path / "pre_acquired")) == 3 * 20 * 20 * 8
    gsvr = check_method_settings({}, "m")
    assert memory_mb(*gsvr, stacks, cuda=False) == MEMORY_MIN_MB  # 10k voxels: the floor
    assert memory_mb(*gsvr, stacks, cuda=True) == 3500  # 1.5 * (700 + 3) + 2000, rounded up to 500
    assert memory_mb(*check_method_settings({"engine": "stack_average"}, "m"), stacks, cuda=False) == MEMORY_MIN_MB
    assert memory_mb(*check_method_settings({"engine": "nesvor"}, "m"), stacks, cuda=True) == 16000
    with pytest.raises(FileNotFoundError) as missing:  # what Snakemake shows as <TBD> before the stacks exist
        memory_mb(*gsvr, [str(tmp_path / "nope.nii.gz")], cuda=False)
    assert missing.value.filename == str(tmp_path / "nope.nii.gz")
    assert runtime_min(*gsvr) == 30 and runtime_min(*gsvr, runs=3) == 90
    assert runtime_min(*check_method_settings({"joint": {"steps": 150}}, "m")) == 105
    assert runtime_min(*check_method_settings({"engine": "stack_average"}, "m")) == 10


def test_run_method_files_writes_a_sidecar_on_the_planned_device(tmp_path):
    stacks, masks = _write_stacks(tmp_path / "in")
    out = _outputs(tmp_path)
    run_method_files({"engine": "stack_average", "run": {"device": "auto"}}, stacks, masks, None, device="cpu",
                     source="config methods.sa", **out)
    record = json.loads((tmp_path / "out" / "volume.json").read_text())
    assert record["method"] == "stack_average" and record["source"] == "config methods.sa" and record["device"] == "cpu"
    assert record["settings"]["run"]["device"] == "cpu"  # the planned device replaced auto
    assert [i["thickness_mm"] for i in record["inputs"]] == [4.0] * 3  # each stack's slice spacing
    assert [i["mask"] for i in record["inputs"]] == masks


def test_an_external_tool_gets_a_sidecar_too(tmp_path):
    stacks, masks = _write_stacks(tmp_path / "in")
    settings, _ = _fake_tool(tmp_path)
    out = _outputs(tmp_path)
    run_method_files(settings, stacks, masks, [4.0] * 3, **out)
    record = json.loads((tmp_path / "out" / "volume.json").read_text())
    assert record["method"] == "nesvor" and record["settings"]["tool"] == "nesvor" and record["device"] == "cuda"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["iterations.tsv", "slices.tsv", "volume.json", "volume.nii.gz"]
