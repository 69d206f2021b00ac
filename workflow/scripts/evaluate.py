import json
import logging

from gsvr.evaluate import evaluate_volume
from gsvr.io.nifti import atomic_output, load_image

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
rec, rec_aff = load_image(snakemake.input.volume, what="reconstruction")
gt, gt_aff = load_image(snakemake.input.reference, what="reference")
mask, _ = load_image(snakemake.input.mask, what="mask")
res = evaluate_volume(rec, rec_aff, gt, gt_aff, mask)
with atomic_output(snakemake.output[0]) as tmp:
    tmp.write_text(json.dumps(res.to_dict(), indent=2) + "\n")
