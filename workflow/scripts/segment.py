import logging
import os

# ITK reads its thread count when the library loads: set it before antspyx is imported.
os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(snakemake.threads)

from gsvr.evaluate.segmentation import SegmentationSettings, segment_file

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
settings = SegmentationSettings.from_dict(snakemake.params.settings)
segment_file(snakemake.input.volume, snakemake.output[0], settings, subject=snakemake.wildcards.subject)
