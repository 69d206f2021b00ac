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
    script:
        "../scripts/preprocess.py"
