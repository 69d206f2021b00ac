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
    log:
        "logs/aggregate.log",
    script:
        "../scripts/aggregate.py"
