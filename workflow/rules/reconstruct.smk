rule reconstruct:
    input:
        unpack(preprocessed),
    output:
        volume="results/{subject}/{method}/volume.nii.gz",
        slices="results/{subject}/{method}/slices.tsv",
        log_tsv="results/{subject}/{method}/iterations.tsv",
    params:
        cfg=lambda wc: config["methods"][wc.method],
        thicknesses=thicknesses,
    log:
        "logs/{subject}/{method}/reconstruct.log",
    benchmark:
        "benchmarks/{subject}/{method}/reconstruct.tsv"
    threads: 8  # capped by --cores locally; the SLURM profile sets its own
    resources:
        gpu=lambda wc: 1 if config["methods"][wc.method].get("device", "auto") == "cuda" else 0,
    conda:
        "../../envs/recon.yaml"
    script:
        "../scripts/reconstruct.py"


# Acquired subjects: leave-one-stack-out self-consistency (one reconstruction per stack).
rule assess:
    input:
        unpack(preprocessed),
    output:
        "results/{subject}/{method}/assess.tsv",
    params:
        cfg=lambda wc: config["methods"][wc.method],
        thicknesses=thicknesses,
    log:
        "logs/{subject}/{method}/assess.log",
    benchmark:
        "benchmarks/{subject}/{method}/assess.tsv"
    threads: 8
    resources:
        gpu=lambda wc: 1 if config["methods"][wc.method].get("device", "auto") == "cuda" else 0,
    conda:
        "../../envs/recon.yaml"
    script:
        "../scripts/assess.py"
