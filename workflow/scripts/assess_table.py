import logging

from gsvr.evaluate.tables import assess_table

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
assess_table(
    snakemake.input.metrics, snakemake.input.times, snakemake.params.subjects, snakemake.params.methods,
    per_subject_csv=snakemake.output.per_subject, table_md=snakemake.output.table,
    not_installed=snakemake.params.not_installed,
)
