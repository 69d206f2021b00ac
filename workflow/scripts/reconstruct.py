import logging

from gsvr.recon.files import run_method_files

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
# stacks: files with their masks (simulated subject), or a folder holding both (acquired subject); the volume's
# provenance sidecar (snakemake.output.sidecar) is written beside it
run_method_files(
    snakemake.params.cfg, snakemake.input.stacks, snakemake.input.get("masks"), snakemake.params.thicknesses,
    output_volume=snakemake.output.volume, output_slices_tsv=snakemake.output.slices,
    output_log=snakemake.output.log_tsv, source=f"config methods.{snakemake.wildcards.method}",
    device=snakemake.params.device,  # the device the job was planned (and given a GPU or not) for
)
