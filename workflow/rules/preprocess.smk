rule preprocess:
    input:
        stacks=rules.simulate.output.stacks,
        masks=rules.simulate.output.masks,
    output:
        stacks=expand("results/{{subject}}/pre/stack{k}.nii.gz", k=range(N_STACKS)),
        masks=expand("results/{{subject}}/pre/stack{k}_mask.nii.gz", k=range(N_STACKS)),
    params:
        pre=config["preprocess"],
    log:
        "logs/{subject}/preprocess.log",
    benchmark:
        "benchmarks/{subject}/preprocess.tsv"
    threads: 1
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/preprocess.py"


# Acquired subjects have their own number of stacks: the outputs are a folder of stack<k>.nii.gz
# and stack<k>_mask.nii.gz, in the sheet's order.
rule preprocess_acquired:
    input:
        stacks=acquired_paths("stacks"),
        masks=acquired_paths("masks"),
    output:
        directory("results/{subject}/pre_acquired"),
    params:
        pre=config["preprocess"],
    log:
        "logs/{subject}/preprocess.log",
    benchmark:
        "benchmarks/{subject}/preprocess.tsv"
    threads: 1
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/preprocess_acquired.py"
