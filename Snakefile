# gsvr workflow: per subject, simulate stacks -> preprocess -> reconstruct with each method -> evaluate -> tables and figures.
from snakemake.utils import min_version

min_version("8.20")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/reconstruct.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/figures.smk"


rule all:
    input:
        "results/tables/quality.md",
        # Every reconstruction and its metrics are targets too: deleting one re-runs its chain.
        expand("results/{subject}/{method}/{file}", subject=SUBJECTS.index, method=METHODS, file=("volume.nii.gz", "metrics.json")),
        expand("results/figures/{subject}_{kind}.png", subject=SUBJECTS.index, kind=("triplanar", "convergence")),
