import dataclasses
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config

from gsvr.baselines.external import PROGRAMS, ExternalSettings
from gsvr.errors import GsvrError
from gsvr.recon.config import ReconConfig
from gsvr.recon.config_reference import FLAT_KEYS, default_yaml, field_docs, migrate_yaml, nest_flat, reference_markdown
from gsvr.recon.files import METHODS

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_keys_are_rejected_with_their_full_path():
    with pytest.raises(GsvrError, match=r"init\.n_gausians"):
        ReconConfig.from_dict({"init": {"n_gausians": 10}})
    with pytest.raises(GsvrError, match="unknown setting"):
        ReconConfig.from_dict({"joint": {"optim": {"lr": {"mean": 0.1}}}})


def test_wrong_types_and_ranges_are_rejected_naming_the_setting():
    with pytest.raises(GsvrError, match=r"init\.n_gaussians must be int"):
        ReconConfig.from_dict({"init": {"n_gaussians": "many"}})
    with pytest.raises(GsvrError, match=r"model\.render_mode"):
        ReconConfig.from_dict({"model": {"render_mode": "fast"}})
    with pytest.raises(GsvrError, match=r"joint\.batch_fraction"):
        ReconConfig.from_dict({"joint": {"batch_fraction": 0.0}})
    with pytest.raises(GsvrError, match=r"joint\.optim\.rotation must be a finite number"):
        ReconConfig.from_dict({"joint": {"optim": {"rotation": float("inf")}}})
    with pytest.raises(GsvrError, match=r"preprocess\.normalize_quantile"):
        ReconConfig.from_dict({"preprocess": {"normalize_quantile": 1.5}})
    with pytest.raises(GsvrError, match=r"preprocess\.crop_margin_mm"):
        ReconConfig.from_dict({"preprocess": {"crop_margin_mm": -10}})
    with pytest.raises(GsvrError, match=r"output\.resolution_mm must be a finite"):
        ReconConfig.from_dict({"output": {"resolution_mm": float("nan")}})
    with pytest.raises(GsvrError, match=r"joint\.optim\.lr\.means must be >= 0"):
        ReconConfig.from_dict({"joint": {"optim": {"lr": {"means": -1.0}}}})
    with pytest.raises(GsvrError, match=r"model cannot be null"):
        ReconConfig.from_dict({"model": None})
    with pytest.raises(GsvrError, match=r"joint\.densify is a section.*null to switch it off"):
        ReconConfig.from_dict({"joint": {"densify": True}})


def test_the_flat_layout_is_refused_naming_the_new_key_of_each_old_one():
    with pytest.raises(GsvrError, match=r"iterations -> joint\.steps.*n_gaussians -> init\.n_gaussians"):
        ReconConfig.from_dict({"n_gaussians": 10, "iterations": 5})
    with pytest.raises(GsvrError, match=r"registration -> align \(null: none\)"):
        ReconConfig.from_dict({"registration": "none"})
    with pytest.raises(GsvrError, match=r"gsvr config --migrate.*slice_weights -> slice_weights \(null: off\)"):
        ReconConfig.from_dict({"slice_weights": False})


def test_every_old_key_has_a_new_home_that_exists():
    """Each target of FLAT_KEYS names settings of the nested config (or a section)."""
    everything = {"block_query": {}, "residual_field": {}, "multires": {}, "loss": {"anisotropy": {}}}
    tree = ReconConfig.from_dict({"joint": {**everything, "densify": {}}}).to_dict()
    tree["joint"]["progressive"] = ReconConfig.from_dict({"joint": {"progressive": {}}}).to_dict()["joint"]["progressive"]
    for old, new in FLAT_KEYS.items():
        for target in new.split(" (")[0].split(" and "):
            node = tree
            for part in target.split("."):
                assert isinstance(node, dict) and part in node, (old, target)
                node = node[part]


def test_old_flat_settings_migrate_to_the_same_switches():
    old = {"iterations": 30, "neighbour_query": "block", "block_mm": 0.0, "block_radius": 2, "nrf": True, "nrf_start": 5,
           "aniso_weight": 0.0, "registration": "none", "init_motion": "svr", "lr_means": 0.1, "densify_every": 0,
           "densify_fraction": 0.2, "slice_weights": False, "weight_every": 7, "checkpoint_every": 0}
    cfg = ReconConfig.from_dict(nest_flat(old))
    assert cfg.joint.steps == 30 and cfg.joint.block_query.size_mm is None and cfg.joint.block_query.radius == 2
    assert cfg.joint.residual_field.start == 5 and cfg.joint.loss.anisotropy is None and cfg.align is None
    assert cfg.svr is not None and cfg.fit.lr.means == cfg.joint.optim.lr.means == 0.1
    assert cfg.joint.densify is None and cfg.slice_weights is None and cfg.run.checkpoint_every is None
    assert ReconConfig.from_dict(nest_flat({"init_motion": "none", "init_fit_steps": 0})).svr is None
    # A component's settings without its switch leave it at gsvr 0.1's default (off), as 0.1 did.
    assert nest_flat({"aniso_max_ratio": 2.0, "densify_fraction": 0.2, "nrf_hidden": 8, "block_radius": 2}) == {}
    fixed = ReconConfig.from_dict(nest_flat({"progressive_spacings_mm": [1.6]})).joint.progressive
    assert fixed.spacings_mm == (1.6,) and fixed.milestones == ()
    for bad in ({"registration": "svort"}, {"nrf": "false"}, {"neighbour_query": "blocks"}):
        with pytest.raises(GsvrError, match=next(iter(bad))):
            nest_flat(bad)


def test_an_old_config_file_migrates_to_a_valid_nested_one(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("iterations: 12\nregistration: none\nnrf: true\noutput_resolution_mm: 1\n")
    cfg = ReconConfig.from_dict(yaml.safe_load(migrate_yaml(old)))
    assert (cfg.joint.steps, cfg.align, cfg.joint.residual_field.start, cfg.output.resolution_mm) == (12, None, 0, 1.0)
    with pytest.raises(GsvrError, match="flat settings"):
        ReconConfig.from_yaml(old)


def test_int_is_accepted_for_float_settings_and_lists_become_tuples():
    cfg = ReconConfig.from_dict({"fit": {"lr": {"means": 1}}, "svr": {"spacings_mm": [3, 1.5]}})
    assert cfg.fit.lr.means == 1.0 and isinstance(cfg.fit.lr.means, float)
    assert cfg.svr.spacings_mm == (3.0, 1.5)
    with pytest.raises(GsvrError, match=r"svr\.spacings_mm"):
        ReconConfig.from_dict({"svr": {"spacings_mm": []}})


def test_a_section_given_switches_its_component_on_and_null_switches_it_off():
    assert ReconConfig().joint.densify is None
    assert ReconConfig.from_dict({"joint": {"densify": {}}}).joint.densify.every == 100
    assert ReconConfig.from_dict({"align": None}).align is None
    cfg = ReconConfig().updated({"output.resolution_mm": 0.5, "align": None, "joint": {"multires": {"steps": 3}}})
    assert (cfg.output.resolution_mm, cfg.align, cfg.joint.multires.steps) == (0.5, None, 3)
    assert cfg.updated({"align": {}}).align.max_angle_deg == 90.0


def test_progressive_grid_settings_are_checked():
    cfg = ReconConfig.from_dict({"joint": {"progressive": {"spacings_mm": [3, 1.5], "milestones": [40]}}})
    assert cfg.joint.progressive.spacings_mm == (3.0, 1.5) and cfg.joint.progressive.milestones == (40,)
    for bad in ({"spacings_mm": [3, 1.5], "milestones": []}, {"spacings_mm": [3], "milestones": [5]},
                {"spacings_mm": [3, 2, 1], "milestones": [50, 20]}, {"spacings_mm": [3, 2], "milestones": [0]}):
        with pytest.raises(GsvrError, match=r"joint\.progressive\.milestones"):
            ReconConfig.from_dict({"joint": {"progressive": bad}})
    with pytest.raises(GsvrError, match="SVR volume"):
        ReconConfig.from_dict({"motion": False, "joint": {"progressive": {"spacings_mm": [2.0], "milestones": []}}})
    with pytest.raises(GsvrError, match="cannot be combined"):
        ReconConfig.from_dict({"joint": {"progressive": {}, "densify": {}}})


def test_every_shipped_workflow_method_validates_alone_and_merged_with_the_cpu_sizes():
    names = ["config", "ablation_gsvr", "ablation_mgaussian", "ablation_gaussiansvr", "ablation_cpu"]
    merged: dict = {}
    for name in names:
        update_config(merged, yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text()))
    checked = 0
    for name, method in merged["methods"].items():
        settings = dict(method)
        engine = settings.pop("engine", "gsvr")
        if engine in PROGRAMS:
            ExternalSettings.from_dict(method, source=name)
            continue
        assert engine in METHODS, name
        cfg = ReconConfig.from_dict(settings, source=name)
        checked += 1
        if name.startswith("mg_") and name != "mg_noSSIM_noPR":  # the CPU sizes keep each row's components
            assert cfg.joint.steps == 40 and cfg.joint.progressive.milestones == (8, 16, 24), name
        if name == "mg_noNRF":
            assert cfg.joint.residual_field is None
    assert checked >= 20


def test_the_shipped_default_config_and_reference_are_generated_from_the_dataclasses():
    """config/recon_default.yaml and docs/configuration.md drift from the code: regenerate them with
    `python -m gsvr.recon.config_reference`."""
    assert (ROOT / "config" / "recon_default.yaml").read_text() == default_yaml()
    assert (ROOT / "docs" / "configuration.md").read_text() == reference_markdown()
    values = yaml.safe_load(default_yaml())
    assert set(values) == {f.name for f in dataclasses.fields(ReconConfig)}
    assert ReconConfig.from_dict(values) == ReconConfig()


def test_every_setting_is_documented_or_self_explanatory():
    from gsvr.recon import config as c

    sections = [c.ModelConfig, c.InitConfig, c.FitConfig, c.JointConfig, c.LossConfig, c.OutputConfig, c.RunConfig]
    undocumented = [f"{cls.__name__}.{f.name}" for cls in sections for f in dataclasses.fields(cls)
                    if not field_docs(cls).get(f.name) and f.name not in {"lr", "optim", "loss", "seed", "weight_decay",
                                                                          "step_size", "step_gamma", "cosine_final"}]
    assert not undocumented


@pytest.mark.parametrize("key, value", [("svr.output_tikhonov_factors", []), ("svr.output_tikhonov_factors", [1.0, 0.0]),
                                        ("svr.output_tikhonov_factors", [True]), ("fit.target", "volume"),
                                        ("refine.sampling", "voxels"), ("refine.pixel_fraction", 0.0),
                                        ("refine.register_rounds", -1), ("refine.register_steps", -1)])
def test_the_held_out_regularisation_fit_target_and_refine_settings_are_checked(key, value):
    with pytest.raises(GsvrError, match=key.split(".")[1]):
        ReconConfig().updated({key: value})
