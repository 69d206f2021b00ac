import logging

from gsvr.recon.config import ReconConfig
from gsvr.recon.files import reconstruct_files

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
settings = dict(snakemake.params.cfg)
engine = settings.pop("engine", "gsvr")  # "gsvr" (Gaussian engine) or "svr_classic" (voxel baseline)
cfg = ReconConfig.from_dict(settings, source=f"config.yaml methods.{snakemake.wildcards.method}")
reconstruct_files(
    snakemake.input.stacks, snakemake.input.masks, None, cfg,
    output_volume=snakemake.output.volume, output_slices_tsv=snakemake.output.slices,
    output_log=snakemake.output.log_tsv, progress=False, method=engine,
)
