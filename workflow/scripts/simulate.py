import logging

from gsvr.io.nifti import load_image
from gsvr.simulate.stacks import SimulationConfig, simulate_stacks, write_simulation

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
vol, aff = load_image(snakemake.input.volume, what="volume")
mask, _ = load_image(snakemake.input.mask, what="mask")
sim = simulate_stacks(vol, mask, aff, SimulationConfig(**snakemake.params.sim))
write_simulation(sim, snakemake.output.motions.rsplit("/", 1)[0])
