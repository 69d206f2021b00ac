import logging

from gsvr.evaluate.segmentation import write_segmentation_scores

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
# volume, reference, mask: the registration that carries a reconstruction's labels (none for the ground truth)
write_segmentation_scores(
    snakemake.input.labels, snakemake.input.truth, snakemake.output[0], settings=snakemake.params.settings,
    volume_path=snakemake.input.get("volume"), reference_path=snakemake.input.get("reference"),
    mask_path=snakemake.input.get("mask"),
)
