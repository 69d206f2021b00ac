import logging

from gsvr.evaluate.figures import convergence_figure, triplanar_panel

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
subject = snakemake.wildcards.subject
methods = snakemake.params.methods
columns = [("ground truth", snakemake.input.reference), ("input stack 0", snakemake.input.stack)]
columns += list(zip(methods, snakemake.input.volumes))
triplanar_panel(columns, snakemake.input.reference, snakemake.input.mask, snakemake.output.triplanar, title=subject)
convergence_figure(dict(zip(methods, snakemake.input.logs)), snakemake.output.convergence, title=subject)
