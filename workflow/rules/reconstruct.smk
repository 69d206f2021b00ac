rule reconstruct:
    input:
        stacks=rules.preprocess.output.stacks,
        masks=rules.preprocess.output.masks,
    output:
        volume="results/{subject}/{method}/volume.nii.gz",
        slices="results/{subject}/{method}/slices.tsv",
        log_tsv="results/{subject}/{method}/iterations.tsv",
    params:
        cfg=lambda wc: config["methods"][wc.method],
    log:
        "logs/{subject}/{method}/reconstruct.log",
    benchmark:
        "benchmarks/{subject}/{method}/reconstruct.tsv"
    threads: 8  # capped by --cores locally; the SLURM profile sets its own
    resources:
        gpu=lambda wc: 1 if config["methods"][wc.method].get("device", "auto") == "cuda" else 0,
    script:
        "../scripts/reconstruct.py"
