import logging

from gsvr.evaluate.segmentation import SegmentationSettings, evaluate_segmentation_files
from gsvr.io.nifti import atomic_output

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
settings = SegmentationSettings.from_dict(snakemake.params.settings)
pose = {} if snakemake.wildcards.method == "ground_truth" else dict(
    volume_path=snakemake.input.volume, reference_path=snakemake.input.reference, mask_path=snakemake.input.mask)
scores = evaluate_segmentation_files(snakemake.input.labels, snakemake.input.truth, merge_labels=settings.merge_labels, **pose)
with atomic_output(snakemake.output[0]) as tmp:
    scores.to_csv(tmp, sep="\t", index=False, float_format="%.5g")
