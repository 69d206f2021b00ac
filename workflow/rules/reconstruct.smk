# What a job asks of the scheduler, decided when the DAG is built (the figures behind them: gsvr.recon.plan).
def on_cuda(wildcards):
    """Whether the method runs on CUDA: run.device cuda, or auto where auto_device says so (common.smk); never
    for stack_average, svrtk and niftymic."""
    engine, settings = METHOD_SETTINGS[wildcards.method]  # parsed when the workflow was read (common.smk)
    return uses_cuda(engine, settings, cuda_available=AUTO_IS_CUDA)


def gpus(wildcards):
    """One GPU for a job that runs on CUDA; none (no gpu resource at all) otherwise."""
    return 1 if on_cuda(wildcards) else None


def device(wildcards):
    """The device the job is planned for; it replaces run.device, so a job without a GPU never uses one."""
    return "cuda" if on_cuda(wildcards) else "cpu"


def n_stacks(wildcards):
    return len(_words(wildcards.subject, "stacks")) if wildcards.subject in ACQUIRED.index else int(config["simulation"]["n_stacks"])


def memory(wildcards, input):
    """mem_mb: the measured peak memory for these stacks, with a margin (gsvr.recon.plan.memory_mb)."""
    return memory_mb(*METHOD_SETTINGS[wildcards.method], input.stacks, cuda=on_cuda(wildcards))


def runtime(wildcards):
    """Minutes: one reconstruction (gsvr.recon.plan.runtime_min)."""
    return runtime_min(*METHOD_SETTINGS[wildcards.method])


def assess_runtime(wildcards):
    """Minutes: one reconstruction per stack (a fold, which starts from the full run's motions, costs less: an
    upper bound)."""
    return runtime_min(*METHOD_SETTINGS[wildcards.method], runs=n_stacks(wildcards))


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
        device=device,
    log:
        "logs/{subject}/{method}/reconstruct.log",
    benchmark:
        "benchmarks/{subject}/{method}/reconstruct.tsv"
    threads: 8  # capped by --cores locally; the SLURM profile sets its own
    resources:
        gpu=gpus,
        mem_mb=memory,
        runtime=runtime,
    conda:
        "../../envs/recon.yaml"
    script:
        "../scripts/reconstruct.py"


# Acquired subjects: leave-one-stack-out self-consistency, one fold per stack, each starting from the slice motions
# of the method's reconstruction of all stacks (its slices.tsv).
rule assess:
    input:
        unpack(preprocessed),
        full_run="results/{subject}/{method}/slices.tsv",
    output:
        "results/{subject}/{method}/assess.tsv",
    params:
        cfg=lambda wc: config["methods"][wc.method],
        thicknesses=thicknesses,
        device=device,
    log:
        "logs/{subject}/{method}/assess.log",
    benchmark:
        "benchmarks/{subject}/{method}/assess.tsv"
    threads: 8
    resources:
        gpu=gpus,
        mem_mb=memory,
        runtime=assess_runtime,
    conda:
        "../../envs/recon.yaml"
    script:
        "../scripts/assess.py"
