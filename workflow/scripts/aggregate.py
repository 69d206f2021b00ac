import logging

from gsvr.evaluate.tables import assess_table, quality_table, segmentation_table

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
kind = snakemake.params.kind
outputs = dict(per_subject_csv=snakemake.output.per_subject, table_md=snakemake.output.table,
               not_installed=snakemake.params.not_installed)
if kind == "segmentation":
    segmentation_table(snakemake.input.scores, snakemake.params.subjects, snakemake.params.methods, **outputs)
else:
    table = {"quality": quality_table, "assess": assess_table}[kind]
    table(snakemake.input.metrics, snakemake.input.times, snakemake.params.subjects, snakemake.params.methods, **outputs)
