import logging

from gsvr.evaluate.tables import ablation_table

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
ablation_table(snakemake.input[0], snakemake.params.rows, table_md=snakemake.output[0], title=snakemake.wildcards.name)
