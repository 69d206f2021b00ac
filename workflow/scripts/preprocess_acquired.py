import logging
from pathlib import Path

from gsvr.preprocess.stacks import PreprocessConfig, folder_stack_paths, preprocess_files

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
# An acquired subject has its own number of stacks: the output is a folder of stack<k>(_mask).nii.gz.
Path(snakemake.output[0]).mkdir(parents=True, exist_ok=True)
out_stacks, out_masks = folder_stack_paths(snakemake.output[0], len(snakemake.input.stacks))
preprocess_files(snakemake.input.stacks, snakemake.input.masks, out_stacks, out_masks, PreprocessConfig(**snakemake.params.pre))
