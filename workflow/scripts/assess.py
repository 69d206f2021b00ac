import logging

from gsvr.recon.files import assess_method_files

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
assess_method_files(
    snakemake.params.cfg, snakemake.input.stacks, snakemake.input.get("masks"), snakemake.params.thicknesses,
    output_tsv=snakemake.output[0], source=f"config methods.{snakemake.wildcards.method}", device=snakemake.params.device,
    full_run_slices=snakemake.input.full_run,
)
