rule figures:
    input:
        reference=subject_path("volume"),
        mask=subject_path("mask"),
        stack="results/{subject}/sim/stack0.nii.gz",
        volumes=expand("results/{{subject}}/{method}/volume.nii.gz", method=METHODS),
        logs=expand("results/{{subject}}/{method}/iterations.tsv", method=METHODS),
    output:
        triplanar=report(
            "results/figures/{subject}_triplanar.png",
            caption="../report/triplanar.rst",
            category="Figures",
            subcategory="{subject}",
        ),
        convergence=report(
            "results/figures/{subject}_convergence.png",
            caption="../report/convergence.rst",
            category="Figures",
            subcategory="{subject}",
        ),
    params:
        methods=METHODS,
    log:
        "logs/{subject}/figures.log",
    threads: 1
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/figures.py"
