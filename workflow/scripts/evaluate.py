import logging

from gsvr.evaluate import evaluate_files

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
evaluate_files(snakemake.input.volume, snakemake.input.reference, snakemake.input.mask, output_json=snakemake.output[0])
