import dataclasses
from pathlib import Path

import pytest
import yaml

from gsvr.errors import GsvrError
from gsvr.baselines.external import PROGRAMS, ExternalSettings
from gsvr.recon.files import METHODS
from gsvr.recon.config import ReconConfig

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_keys_are_rejected():
    with pytest.raises(GsvrError, match="unknown reconstruction setting"):
        ReconConfig.from_dict({"n_gausians": 10})


def test_wrong_types_and_ranges_are_rejected():
    with pytest.raises(GsvrError, match="n_gaussians must be int"):
        ReconConfig.from_dict({"n_gaussians": "many"})
    with pytest.raises(GsvrError, match="render_mode"):
        ReconConfig.from_dict({"render_mode": "fast"})
    with pytest.raises(GsvrError, match="batch_fraction"):
        ReconConfig.from_dict({"batch_fraction": 0.0})


def test_int_is_accepted_for_float_settings():
    assert ReconConfig.from_dict({"lr_means": 1}).lr_means == 1.0


def test_every_shipped_reconstruction_config_loads():
    paths = sorted((ROOT / "config").glob("recon*.yaml"))
    assert paths, "no reconstruction configs shipped"
    for path in paths:
        ReconConfig.from_yaml(path)
    for workflow_config in ("config.yaml", "ablation_gsvr.yaml"):
        workflow = yaml.safe_load((ROOT / "config" / workflow_config).read_text())
        for name, method in workflow["methods"].items():
            settings = dict(method)
            source = f"{workflow_config} methods.{name}"
            engine = settings.get("engine", "gsvr")
            if engine in PROGRAMS:
                ExternalSettings.from_dict(settings, source=source)
            else:
                settings.pop("engine", None)
                assert engine in METHODS, source
                ReconConfig.from_dict(settings, source=source)


def test_the_shipped_default_config_lists_every_setting_at_its_default():
    values = yaml.safe_load((ROOT / "config" / "recon_default.yaml").read_text())
    assert set(values) == {f.name for f in dataclasses.fields(ReconConfig)}
    assert ReconConfig.from_dict(values) == ReconConfig()


def test_lists_from_yaml_become_tuples():
    cfg = ReconConfig.from_dict({"svr_spacings_mm": [3, 1.5]})
    assert cfg.svr_spacings_mm == (3.0, 1.5)
    with pytest.raises(GsvrError, match="svr_spacings_mm"):
        ReconConfig.from_dict({"svr_spacings_mm": []})


def test_progressive_grid_settings_are_checked():
    cfg = ReconConfig.from_dict({"progressive_spacings_mm": [3, 1.5], "progressive_milestones": [40]})
    assert cfg.progressive_spacings_mm == (3.0, 1.5) and cfg.progressive_milestones == (40,)
    for bad in ({"progressive_spacings_mm": [3, 1.5]}, {"progressive_spacings_mm": [3], "progressive_milestones": [5]},
                {"progressive_spacings_mm": [3, 2, 1], "progressive_milestones": [50, 20]},
                {"progressive_spacings_mm": [3, 2], "progressive_milestones": [0]}):
        with pytest.raises(GsvrError, match="progressive_milestones"):
            ReconConfig.from_dict(bad)
    with pytest.raises(GsvrError, match="SVR volume"):
        ReconConfig(progressive_spacings_mm=(2.0,), motion=False)
