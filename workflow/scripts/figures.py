import logging

from gsvr.evaluate.figures import subject_figures

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
methods = snakemake.params.methods
subject_figures(
    snakemake.input.reference, snakemake.input.mask, snakemake.input.stack,
    dict(zip(methods, snakemake.input.volumes)), dict(zip(methods, snakemake.input.logs)),
    triplanar_png=snakemake.output.triplanar, convergence_png=snakemake.output.convergence,
    title=snakemake.wildcards.subject,
)
