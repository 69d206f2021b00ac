import logging

import pandas as pd

from gsvr.baselines.external import PROGRAMS, ExternalSettings, run_external
from gsvr.io.nifti import atomic_output
from gsvr.preprocess.stacks import folder_stack_paths
from gsvr.recon.config import ReconConfig
from gsvr.recon.engine import HISTORY_COLUMNS
from gsvr.recon.files import reconstruct_files

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
settings = dict(snakemake.params.cfg)
source = f"config.yaml methods.{snakemake.wildcards.method}"
if "masks" in snakemake.input.keys():
    stacks, masks = snakemake.input.stacks, snakemake.input.masks
else:  # acquired subject: a folder of preprocessed stacks
    stacks, masks = folder_stack_paths(snakemake.input.stacks)
engine = settings.pop("engine", "gsvr")  # gsvr, svr_classic, stack_average, or an external tool
if engine in PROGRAMS:
    run_external(ExternalSettings.from_dict({**settings, "engine": engine}, source=source), stacks, masks,
                 snakemake.params.thicknesses, snakemake.output.volume)
    # The tools report no per-slice table or per-step log in gsvr's format: header-only files.
    for columns, path in ((["stack", "slice_index"], snakemake.output.slices), (HISTORY_COLUMNS, snakemake.output.log_tsv)):
        with atomic_output(path) as tmp:
            pd.DataFrame(columns=columns).to_csv(tmp, sep="\t", index=False)
else:
    reconstruct_files(
        stacks, masks, snakemake.params.thicknesses, ReconConfig.from_dict(settings, source=source),
        output_volume=snakemake.output.volume, output_slices_tsv=snakemake.output.slices,
        output_log=snakemake.output.log_tsv, progress=False, method=engine,
    )
