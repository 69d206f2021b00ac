"""Per-subject metrics -> paper-style tables (mean +- std per method, best in bold)."""

from __future__ import annotations

import json
from typing import Sequence

import pandas as pd

from gsvr.io.nifti import atomic_output

#: metric -> True when higher is better
METRICS = {"psnr": True, "ssim": True, "ncc": True, "nrmse": False, "time_s": False}


def quality_table(metrics_json: Sequence[str], bench_tsv: Sequence[str], subjects: Sequence[str], methods: Sequence[str],
                  *, per_subject_csv: str, table_md: str) -> pd.DataFrame:
    """Inputs are ordered subject-major, method-minor (as snakemake's expand gives them)."""
    rows = []
    pairs = [(s, m) for s in subjects for m in methods]
    for (subject, method), mj, bt in zip(pairs, metrics_json, bench_tsv):
        with open(mj) as fh:
            row = json.load(fh)
        row["time_s"] = float(pd.read_csv(bt, sep="\t")["s"].iloc[0])
        rows.append({"subject": subject, "method": method, **row})
    df = pd.DataFrame(rows)
    with atomic_output(per_subject_csv) as tmp:
        df.to_csv(tmp, index=False, float_format="%.5g")
    lines = ["| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    stats = df.groupby("method", sort=False)[list(METRICS)].agg(["mean", "std"])
    best = {m: (stats[(m, "mean")].idxmax() if hi else stats[(m, "mean")].idxmin()) for m, hi in METRICS.items()}
    for method in methods:
        cells = []
        for metric in METRICS:
            mean, std = stats.loc[method, (metric, "mean")], stats.loc[method, (metric, "std")]
            fmt = "{:.2f}" if metric in ("psnr", "time_s") else "{:.3f}"
            text = fmt.format(mean) + ("" if pd.isna(std) else " ± " + fmt.format(std))
            cells.append(f"**{text}**" if best[metric] == method and len(methods) > 1 else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    with atomic_output(table_md) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return df
