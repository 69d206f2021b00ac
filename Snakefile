# gsvr workflow: per subject, simulate stacks -> reconstruct with each method -> evaluate -> tables.
from snakemake.utils import min_version

min_version("8.20")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/reconstruct.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        "results/tables/quality.md",
