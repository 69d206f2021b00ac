"""Per-subject metrics -> paper-style tables (mean +- std per method, best in bold)."""

from __future__ import annotations

import json
from typing import Mapping, Sequence

import pandas as pd

from gsvr.io.nifti import atomic_output

#: metric -> True when higher is better (ground-truth quality table)
METRICS = {"psnr": True, "ssim": True, "ncc": True, "nrmse": False, "time_s": False}
#: metric -> True when higher is better (leave-one-stack-out table of acquired subjects, ``gsvr assess``)
ASSESS_METRICS = {"ncc": True, "psnr": True, "ncc_slices": True, "psnr_slices": True, "time_s": False}


def _bench_seconds(path: str) -> float:
    return float(pd.read_csv(path, sep="\t")["s"].iloc[0])


def markdown_table(df: pd.DataFrame, methods: Sequence[str], metrics: dict[str, bool],
                   not_installed: Mapping[str, str] | None = None, fmt: str | None = None) -> str:
    """Mean ± std over the rows of each method, the best mean of each metric in bold; then one row per
    method that could not run (``not_installed``: method -> reason). ``fmt``: one number format for all
    columns (default: 3 decimals for ncc/ssim/nrmse, else 2)."""
    lines = ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    stats = df.groupby("method", sort=False)[list(metrics)].agg(["mean", "std"])
    best = {m: (stats[(m, "mean")].idxmax() if hi else stats[(m, "mean")].idxmin()) for m, hi in metrics.items()}
    for method in methods:
        cells = []
        for metric in metrics:
            mean, std = stats.loc[method, (metric, "mean")], stats.loc[method, (metric, "std")]
            f = fmt or ("{:.3f}" if metric.startswith(("ncc", "ssim", "nrmse")) else "{:.2f}")
            text = f.format(mean) + ("" if pd.isna(std) else " ± " + f.format(std))
            cells.append(f"**{text}**" if best[metric] == method and len(methods) > 1 else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for method, why in (not_installed or {}).items():
        lines.append(f"| {method} | {why} |" + " |" * (len(metrics) - 1))
    return "\n".join(lines) + "\n"


def _write(df: pd.DataFrame, methods: Sequence[str], metrics: dict[str, bool], per_subject_csv: str, table_md: str,
           not_installed: Mapping[str, str] | None) -> None:
    with atomic_output(per_subject_csv) as tmp:
        df.to_csv(tmp, index=False, float_format="%.5g")
    with atomic_output(table_md) as tmp:
        tmp.write_text(markdown_table(df, methods, metrics, not_installed))


def quality_table(metrics_json: Sequence[str], bench_tsv: Sequence[str], subjects: Sequence[str], methods: Sequence[str],
                  *, per_subject_csv: str, table_md: str, not_installed: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Ground-truth metrics; inputs are ordered subject-major, method-minor (as snakemake's expand gives them)."""
    rows = []
    pairs = [(s, m) for s in subjects for m in methods]
    for (subject, method), mj, bt in zip(pairs, metrics_json, bench_tsv, strict=True):
        with open(mj) as fh:
            row = json.load(fh)
        rows.append({"subject": subject, "method": method, **row, "time_s": _bench_seconds(bt)})
    df = pd.DataFrame(rows)
    _write(df, methods, METRICS, per_subject_csv, table_md, not_installed)
    return df


def assess_table(assess_tsv: Sequence[str], bench_tsv: Sequence[str], subjects: Sequence[str], methods: Sequence[str],
                 *, per_subject_csv: str, table_md: str, not_installed: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Leave-one-stack-out means of acquired subjects (``gsvr assess``'s ``mean`` row) with the wall time
    of the subject's full reconstruction; inputs ordered subject-major, method-minor."""
    rows = []
    pairs = [(s, m) for s in subjects for m in methods]
    for (subject, method), at, bt in zip(pairs, assess_tsv, bench_tsv, strict=True):
        table = pd.read_csv(at, sep="\t")
        mean = table[table["stack"] == "mean"].iloc[0]
        rows.append({"subject": subject, "method": method, "n_stacks": len(table) - 1,
                     **{k: float(mean[k]) for k in ASSESS_METRICS if k != "time_s"}, "time_s": _bench_seconds(bt)})
    df = pd.DataFrame(rows)
    _write(df, methods, ASSESS_METRICS, per_subject_csv, table_md, not_installed)
    return df


#: segmentation score -> (True when higher is better, number format, heading)
SEGMENTATION_SCORES = {"dice": (True, "{:.3f}", "Dice"), "hd95_mm": (False, "{:.2f}", "HD95 (mm)"),
                       "assd_mm": (False, "{:.2f}", "ASSD (mm)")}


def segmentation_table(score_tsv: Sequence[str], subjects: Sequence[str], methods: Sequence[str], *,
                       per_subject_csv: str, table_md: str, not_installed: Mapping[str, str] | None = None) -> pd.DataFrame:
    """M-Gaussian Table 5: Dice, HD95 and ASSD per structure and their mean, one table each, methods as
    rows (``ground_truth``: the ground-truth volume segmented as if it were a reconstruction); inputs
    ordered subject-major, method-minor."""
    frames = []
    pairs = [(s, m) for s in subjects for m in methods]
    for (subject, method), path in zip(pairs, score_tsv, strict=True):
        frames.append(pd.read_csv(path, sep="\t").assign(subject=subject, method=method))
    df = pd.concat(frames, ignore_index=True)[["subject", "method", "structure", *SEGMENTATION_SCORES]]
    with atomic_output(per_subject_csv) as tmp:
        df.to_csv(tmp, index=False, float_format="%.5g")
    structures = list(dict.fromkeys(df["structure"]))
    parts = []
    for score, (higher, fmt, heading) in SEGMENTATION_SCORES.items():
        wide = df.pivot_table(index=["subject", "method"], columns="structure", values=score, dropna=False, sort=False)
        wide = wide[structures].reset_index()
        parts.append(f"### {heading}\n\n" + markdown_table(wide, methods, {s: higher for s in structures},
                                                            not_installed, fmt=fmt))
    with atomic_output(table_md) as tmp:
        tmp.write_text("\n".join(parts))
    return df


def ablation_table(per_subject_csv: str, rows: Mapping[str, str], *, table_md: str, title: str = "") -> pd.DataFrame:
    """An ablation in a paper's layout from the quality table's per-subject rows: one row per entry of
    ``rows`` (label -> method; the first is the reference), mean PSNR/SSIM/NCC/time over the subjects,
    and the PSNR and SSIM differences to the reference row."""
    df = pd.read_csv(per_subject_csv)
    missing = sorted(set(rows.values()) - set(df["method"]))
    if missing:
        raise ValueError(f"{per_subject_csv}: no results for ablation method(s) {', '.join(missing)}")
    means = df.groupby("method")[["psnr", "ssim", "ncc", "time_s"]].mean()
    ref = means.loc[next(iter(rows.values()))]
    lines = ([f"### {title}", ""] if title else []) + [
        f"Mean over {df['subject'].nunique()} subject(s); Δ against the first row.", "",
        "| variant | method | PSNR | SSIM | NCC | time s | Δ PSNR | Δ SSIM |", "|---|---|---|---|---|---|---|---|"]
    out = []
    for label, method in rows.items():
        m = means.loc[method]
        lines.append(f"| {label} | {method} | {m.psnr:.2f} | {m.ssim:.4f} | {m.ncc:.3f} | {m.time_s:.1f} | "
                     f"{m.psnr - ref.psnr:+.2f} | {m.ssim - ref.ssim:+.4f} |")
        out.append({"variant": label, "method": method, **m.to_dict(), "d_psnr": m.psnr - ref.psnr, "d_ssim": m.ssim - ref.ssim})
    with atomic_output(table_md) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return pd.DataFrame(out)

