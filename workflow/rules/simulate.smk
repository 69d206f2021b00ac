N_STACKS = config["simulation"]["n_stacks"]


rule simulate:
    input:
        volume=subject_path("volume"),
        mask=subject_path("mask"),
    output:
        stacks=expand("results/{{subject}}/sim/stack{k}.nii.gz", k=range(N_STACKS)),
        masks=expand("results/{{subject}}/sim/stack{k}_mask.nii.gz", k=range(N_STACKS)),
        motions="results/{subject}/sim/motions.tsv",
    params:
        sim=config["simulation"],
    log:
        "logs/{subject}/simulate.log",
    benchmark:
        "benchmarks/{subject}/simulate.tsv"
    threads: 1
    conda:
        "../../envs/recon.yaml"
    script:
        "../scripts/simulate.py"

