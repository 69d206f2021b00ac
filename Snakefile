# gsvr workflow: per subject with ground truth, simulate stacks -> preprocess -> reconstruct with each method ->
# evaluate (intensities; segmentation where the sheet gives labels) -> tables and figures; per acquired subject, preprocess -> reconstruct -> leave-one-stack-out assessment.
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
include: "workflow/rules/segment.smk"


rule all:
    input:
        # Every reconstruction is a target too: deleting one re-runs its chain.
        expand("results/{subject}/{method}/{file}", subject=SUBJECTS.index, method=METHODS, file=("volume.nii.gz", "metrics.json")),
        expand("results/figures/{subject}_{kind}.png", subject=SUBJECTS.index, kind=("triplanar", "convergence")),
        ["results/tables/quality.md"] if len(SUBJECTS) else [],
        ["results/tables/segmentation.md"] if SEGMENTED else [],
        expand("results/tables/ablation_{name}.md", name=ABLATIONS),
        expand("results/{subject}/{method}/volume.nii.gz", subject=ACQUIRED.index, method=METHODS),
        ["results/tables/assess.md"] if len(ACQUIRED) and ASSESS_METHODS else [],
