def gpus(wildcards):
    """1 when the method asks for CUDA (its run.device), else 0."""
    settings = METHOD_SETTINGS[wildcards.method][1]  # parsed when the workflow was read (common.smk)
    return 1 if getattr(getattr(settings, "run", None), "device", "auto") == "cuda" else 0


rule reconstruct:
    input:
        unpack(preprocessed),
    output:
        volume="results/{subject}/{method}/volume.nii.gz",
        sidecar="results/{subject}/{method}/volume.json",  # provenance: resolved settings, input hashes, versions
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
        gpu=gpus,
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
        gpu=gpus,
    conda:
        "../../envs/recon.yaml"
    script:
        "../scripts/assess.py"
