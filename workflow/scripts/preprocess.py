import logging

from gsvr.preprocess.stacks import PreprocessConfig, preprocess_files

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
preprocess_files(snakemake.input.stacks, snakemake.input.masks, snakemake.output.stacks, snakemake.output.masks,
                 PreprocessConfig(**snakemake.params.pre))
