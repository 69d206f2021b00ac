import logging

from gsvr.evaluate.assess import assess_files
from gsvr.preprocess.stacks import folder_stack_paths
from gsvr.recon.config import ReconConfig

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
settings = dict(snakemake.params.cfg)
engine = settings.pop("engine", "gsvr")
cfg = ReconConfig.from_dict(settings, source=f"config.yaml methods.{snakemake.wildcards.method}")
stacks, masks = folder_stack_paths(snakemake.input.stacks)
assess_files(stacks, masks, snakemake.params.thicknesses, cfg, method=engine, output_tsv=snakemake.output[0], progress=False)
