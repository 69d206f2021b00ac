"""The reconstruction settings as documents: the generated defaults file and reference, and the
migration of files in the flat layout of gsvr 0.1.

    python -m gsvr.recon.config_reference   # rewrites config/recon_default.yaml and docs/configuration.md
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from gsvr.errors import GsvrError
from gsvr.recon.config import ReconConfig
from gsvr.recon.typed import is_optional, merge, read_yaml, section_type, type_hints


# ---------------------------------------------------------------------------------------------------
# The flat layout of gsvr 0.1: old key -> new key (for the refusal message and for migrating files).
FLAT_KEYS = {
    "n_gaussians": "init.n_gaussians", "k_neighbors": "model.k_neighbors", "render_mode": "model.render_mode",
    "psf": "model.psf", "delta": "model.delta", "iterations": "joint.steps", "multires_steps": "joint.multires.steps",
    "batch_fraction": "joint.batch_fraction", "chunk_pixels": "model.chunk_pixels", "knn_every": "model.knn_every",
    "knn_backend": "model.knn_backend", "neighbour_query": "joint.block_query (null: top-K)",
    "block_mm": "joint.block_query.size_mm", "block_radius": "joint.block_query.radius",
    "checkpoint_every": "run.checkpoint_every", "lr_means": "fit.lr.means and joint.optim.lr.means",
    "lr_scales": "fit.lr.scales and joint.optim.lr.scales", "lr_quats": "fit.lr.quats and joint.optim.lr.quats",
    "lr_values": "fit.lr.values and joint.optim.lr.values", "lr_rotation": "joint.optim.rotation",
    "lr_translation": "joint.optim.translation", "lr_slice_scale": "joint.optim.slice_scale",
    "weight_decay": "joint.optim.weight_decay", "schedule": "joint.optim.schedule", "step_size": "joint.optim.step_size",
    "step_gamma": "joint.optim.step_gamma", "cosine_final": "joint.optim.cosine_final", "motion": "motion",
    "motion_warmup": "joint.motion_warmup", "joint_motion": "joint.motion", "init_motion": "svr (null: none)",
    "svr_spacings_mm": "svr.spacings_mm", "svr_translation_only_cycles": "svr.translation_only_cycles",
    "svr_stack_spacings_mm": "svr.stack_spacings_mm", "svr_registration_steps": "svr.reg_steps",
    "svr_cg_iterations": "svr.cg_iterations", "svr_tikhonov": "svr.tikhonov", "svr_leave_one_out": "svr.leave_one_out",
    "svr_robust": "svr.robust", "svr_prior": "svr.prior", "svr_edge_delta": "svr.edge_delta",
    "init_from_svr": "init.from_svr", "init_fit_steps": "fit.steps (0: fit: null)", "loss": "joint.loss.pixel",
    "smooth_l1_beta": "joint.loss.smooth_l1_beta", "ssim_weight": "joint.loss.ssim_weight",
    "ssim_window": "joint.loss.ssim_window", "tv_weight": "joint.loss.tv_weight",
    "nrf": "joint.residual_field (null: off)", "nrf_start": "joint.residual_field.start",
    "nrf_bound": "joint.residual_field.bound", "nrf_bands": "joint.residual_field.bands",
    "nrf_hidden": "joint.residual_field.hidden", "nrf_layers": "joint.residual_field.layers",
    "lr_nrf": "joint.residual_field.lr", "scale_reg_weight": "joint.loss.scale_reg_weight",
    "scale_target_mm": "joint.loss.scale_target_mm", "aniso_weight": "joint.loss.anisotropy.weight (0: anisotropy: null)",
    "aniso_max_ratio": "joint.loss.anisotropy.max_ratio", "gauge_weight": "joint.loss.gauge_weight",
    "init_adaptive": "init.adaptive", "lambda_init": "init.lambda_init",
    "progressive_spacings_mm": "joint.progressive.spacings_mm ([]: progressive: null)",
    "progressive_milestones": "joint.progressive.milestones", "grid_scale": "joint.progressive.grid_scale",
    "densify_every": "joint.densify.every (0: densify: null)", "densify_until": "joint.densify.until (0: null)",
    "densify_fraction": "joint.densify.fraction", "split_scale_mm": "joint.densify.split_scale_mm",
    "prune_fraction": "joint.densify.prune_fraction", "max_gaussians": "joint.densify.max_gaussians",
    "init_scale_min_mm": "init.scale_min_mm", "init_scale_max_mm": "init.scale_max_mm",
    "slice_weights": "slice_weights (null: off)", "weight_every": "slice_weights.every",
    "weight_z_scale": "slice_weights.z_scale", "weight_mad_floor": "slice_weights.mad_floor",
    "crop_margin_mm": "preprocess.crop_margin_mm", "standardise_stacks": "preprocess.standardise",
    "n4_bias_correction": "preprocess.n4", "registration": "align (null: none)",
    "registration_max_angle_deg": "align.max_angle_deg", "normalize_quantile": "preprocess.normalize_quantile",
    "output_resolution_mm": "output.resolution_mm", "output_k_neighbors": "output.k_neighbors",
    "seed": "run.seed", "device": "run.device",
}
#: Old switches whose "off" value becomes a null section: old key -> (section path, value meaning off,
#: the old default, the values the old key allowed (None: any number or list)).
_SWITCHES = {"registration": ("align", "none", "stack", ("stack", "none")),
             "init_motion": ("svr", "none", "svr", ("svr", "none")),
             "init_fit_steps": ("fit", 0, 100, None),
             "neighbour_query": ("joint.block_query", "topk", "topk", ("topk", "block")),
             "nrf": ("joint.residual_field", False, False, (True, False)),
             "densify_every": ("joint.densify", 0, 0, None),
             "progressive_spacings_mm": ("joint.progressive", (), (), None),
             "multires_steps": ("joint.multires", 0, 0, None),
             "aniso_weight": ("joint.loss.anisotropy", 0.0, 0.0, None),
             "slice_weights": ("slice_weights", False, True, (True, False))}
#: Switches that only say on or off; the others (a count, a weight, a list) are also a setting of the section.
_ONLY_SWITCH = {"registration", "init_motion", "neighbour_query", "nrf", "slice_weights"}
#: Old settings whose 0 meant "automatic" or "never", now null.
_ZERO_IS_NULL = {"block_mm", "densify_until", "checkpoint_every"}


def nest_flat(flat: Mapping[str, Any]) -> dict:
    """The nested settings equivalent to a flat settings mapping of gsvr 0.1 (migration of old files).

    A component is on or off as its old switch says, or as the old default when the switch is absent;
    the settings of a component that is off are dropped, as gsvr 0.1 ignored them."""
    unknown = sorted(set(flat) - set(FLAT_KEYS))
    if unknown:
        raise GsvrError(f"unknown flat setting(s) {', '.join(unknown)}")
    on = {}
    for key, (section, off, default, allowed) in _SWITCHES.items():
        value = flat.get(key, default)
        if allowed is not None and (value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool)):
            raise GsvrError(f"{key} must be one of {allowed}, got {value!r}")
        on[section] = not (value == off or (isinstance(off, tuple) and not value))
    out: dict = {}
    for section, enabled in on.items():
        out = merge(out, {section: {} if enabled else None})
    if on["joint.progressive"]:
        out = merge(out, {"joint.progressive.milestones": []})  # gsvr 0.1's default: a fixed grid
    for key, value in flat.items():
        if key in _ONLY_SWITCH:
            continue
        if key in _ZERO_IS_NULL and value == 0:
            value = None
        for target in FLAT_KEYS[key].split(" (")[0].split(" and "):
            section = target.rsplit(".", 1)[0]
            if any(section == s or section.startswith(s + ".") for s, enabled in on.items() if not enabled):
                continue  # a setting of a component switched off
            out = merge(out, {target: list(value) if isinstance(value, tuple) else value})
    return prune_defaults(out)


def prune_defaults(nested: dict) -> dict:
    """``nested`` without what only restates a default: empty sections that are on by default, and nulls
    of sections that are off by default."""
    defaults = ReconConfig().to_dict()

    def walk(values: dict, base: dict | None) -> dict:
        kept = {}
        for key, value in values.items():
            if isinstance(value, dict):
                inner = walk(value, base.get(key) if isinstance(base, dict) else None)
                if inner or not isinstance(base, dict) or base.get(key) is None:
                    kept[key] = inner
            elif not (value is None and isinstance(base, dict) and key in base and base[key] is None):
                kept[key] = value
        return kept

    return walk(nested, defaults)


# ---------------------------------------------------------------------------------------------------
# Generated reference: YAML with every default and Markdown tables, both from the dataclasses' comments.

def field_docs(cls: type) -> dict[str, str]:
    """The ``#:`` comments of a dataclass's fields (inline, or on the lines above the field)."""
    docs, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        m = re.match(r"\s+(\w+):\s*[^=]+=.*?(?:#:\s*(.*))?$", line)
        if m and m.group(1) in {f.name for f in dataclasses.fields(cls)}:
            docs[m.group(1)] = " ".join(pending + ([m.group(2).strip()] if m.group(2) else []))
        pending = []
    return docs


def _yaml_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").removesuffix(" ...")


def _walk(cls: type, instance: Any, depth: int, lines: list[str]) -> None:
    docs, hints = field_docs(cls), type_hints(cls)
    for f in dataclasses.fields(cls):
        value, section = getattr(instance, f.name), section_type(hints[f.name])
        pad = "  " * depth
        note = f"  # {docs[f.name]}" if docs.get(f.name) else ""
        if section is not None:
            head = inspect.getdoc(section).splitlines()[0] if inspect.getdoc(section) else ""
            if value is None:
                lines.append(f"{pad}{f.name}: null{note or f'  # {head}'}  (off; its settings: {', '.join(x.name for x in dataclasses.fields(section))})")
                continue
            lines.append(f"{pad}{f.name}:{note or f'  # {head}'}")
            _walk(section, value, depth + 1, lines)
        else:
            lines.append(f"{pad}{f.name}: {_yaml_value(value)}{note}")


def default_yaml() -> str:
    """``config/recon_default.yaml``: every setting with its default and its comment."""
    lines = ["# gsvr reconstruct --config: every setting with its default, generated from src/gsvr/recon/config.py",
             "# (python -m gsvr.recon.config_reference; a test fails when it drifts). Delete what you do not change;",
             "# unknown keys are an error; a section set to null switches its component off."]
    _walk(ReconConfig, ReconConfig(), 0, lines)
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """``docs/configuration.md``: one table per section."""
    out = ["# Configuration reference", "",
           "Generated from `src/gsvr/recon/config.py` by `python -m gsvr.recon.config_reference` (a test fails when it drifts).",
           "Give settings to `gsvr reconstruct --config FILE.yaml` or as a method in the workflow's `config/config.yaml`,",
           "nested by section as below; `config/recon_default.yaml` lists them all with their defaults. A section",
           "marked *optional* is `null` when its component is off; giving it (even `{}`) switches it on with the",
           "defaults shown. The flat keys of gsvr 0.1 are refused with the new name of each.", ""]

    def table(cls: type, path: str, instance: Any, optional: bool) -> None:
        docs, hints = field_docs(cls), type_hints(cls)
        out.extend([f"## `{path}`" + (" (optional)" if optional else ""), "", inspect.getdoc(cls) or "", "",
                    "| setting | default | meaning |", "|---|---|---|"])
        nested = []
        for f in dataclasses.fields(cls):
            section = section_type(hints[f.name])
            value = getattr(instance, f.name)
            if section is not None:
                nested.append((section, f"{path}.{f.name}" if path else f.name, value if value is not None else section(),
                               is_optional(hints[f.name])))
                shown = "null" if value is None else "section"
            else:
                shown = _yaml_value(value)
            meaning = docs.get(f.name) or (inspect.getdoc(section).splitlines()[0] if section is not None else "")
            out.append(f"| `{f.name}` | `{shown}` | {meaning} |")
        out.append("")
        for args in nested:
            table(*args)

    table(ReconConfig, "", ReconConfig(), False)
    out[out.index("## ``")] = "## Top level"
    return "\n".join(out).rstrip() + "\n"


def write_references(root: Path) -> None:
    (root / "config" / "recon_default.yaml").write_text(default_yaml())
    (root / "docs" / "configuration.md").write_text(reference_markdown())


def migrate_yaml(path: str | Path) -> str:
    """A reconstruction config file in the flat layout of gsvr 0.1, rewritten in sections."""
    flat = read_yaml(path)
    try:
        nested = nest_flat(flat)
        ReconConfig.from_dict(nested, source=str(path))  # the result must be valid
    except GsvrError as exc:  # name the file the problem is in
        message = str(exc)
        raise GsvrError(message if message.startswith(f"{path}:") else f"{path}: {message.removeprefix('config: ')}") from exc
    return yaml.safe_dump(nested, sort_keys=False)


if __name__ == "__main__":  # regenerate config/recon_default.yaml and docs/configuration.md
    write_references(Path(__file__).resolve().parents[3])
