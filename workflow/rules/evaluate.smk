rule evaluate:
    input:
        volume="results/{subject}/{method}/volume.nii.gz",
        reference=subject_path("volume"),
        mask=subject_path("mask"),
    output:
        "results/{subject}/{method}/metrics.json",
    log:
        "logs/{subject}/{method}/evaluate.log",
    benchmark:
        "benchmarks/{subject}/{method}/evaluate.tsv"
    threads: 1
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/evaluate.py"


rule aggregate:
    input:
        metrics=expand("results/{subject}/{method}/metrics.json", subject=SUBJECTS.index, method=METHODS),
        times=expand("benchmarks/{subject}/{method}/reconstruct.tsv", subject=SUBJECTS.index, method=METHODS),
    output:
        per_subject=report("results/tables/per_subject.csv", caption="../report/quality.rst", category="Tables"),
        table="results/tables/quality.md",
    params:
        subjects=list(SUBJECTS.index),
        methods=METHODS,
        not_installed=NOT_INSTALLED,
    log:
        "logs/aggregate.log",
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/quality_table.py"


# Acquired subjects (no ground truth): the leave-one-stack-out table.
rule aggregate_assess:
    input:
        metrics=expand("results/{subject}/{method}/assess.tsv", subject=ACQUIRED.index, method=ASSESS_METHODS),
        times=expand("benchmarks/{subject}/{method}/reconstruct.tsv", subject=ACQUIRED.index, method=ASSESS_METHODS),
    output:
        per_subject=report("results/tables/assess_per_subject.csv", caption="../report/assess.rst", category="Tables"),
        table="results/tables/assess.md",
    params:
        subjects=list(ACQUIRED.index),
        methods=ASSESS_METHODS,
        not_installed={m: w for m, w in NOT_INSTALLED.items() if m in config.get("assess_methods", config["methods"])},
    log:
        "logs/aggregate_assess.log",
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/assess_table.py"


# Ablations (config `ablations:`): rows of the quality table in a paper's layout, with differences to the first row.
rule aggregate_ablation:
    input:
        "results/tables/per_subject.csv",
    output:
        "results/tables/ablation_{name}.md",
    params:
        rows=lambda wildcards: config["ablations"][wildcards.name],
    log:
        "logs/aggregate_ablation_{name}.log",
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/ablation.py"
