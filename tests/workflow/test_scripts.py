"""The gsvr entry points the workflow scripts call, on small files (the scripts themselves only pass
snakemake's inputs and params on: tests/workflow/test_workflow.py checks they stay that way)."""

import json

import nibabel as nib
import numpy as np
import pandas as pd

from gsvr.evaluate import evaluate_files, evaluate_volume
from gsvr.evaluate.segmentation import write_segmentation_scores


def _blob(tmp_path):
    grid = np.indices((24, 24, 24)).astype(np.float32)
    vol = np.exp(-(((grid - 11.5) / 6.0) ** 2).sum(0)).astype(np.float32)
    vol += 0.3 * (grid[0] > 12)  # some structure for the registration
    mask = (vol > 0.2).astype(np.uint8)
    labels = mask * (1 + (grid[0] > 12)).astype(np.int16)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = {}
    for name, data in (("volume", vol), ("mask", mask), ("labels", labels)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), paths[name])
    return vol, mask, affine, paths


def test_evaluate_files_writes_what_evaluate_volume_computes(tmp_path):
    vol, mask, affine, paths = _blob(tmp_path)
    out = tmp_path / "metrics.json"
    result = evaluate_files(paths["volume"], paths["volume"], paths["mask"], output_json=out, register=False)
    assert json.loads(out.read_text()) == result.to_dict() == evaluate_volume(vol, affine, vol, affine, mask,
                                                                              register=False).to_dict()
    assert result.ncc > 0.999 and out.read_text().endswith("}\n")
    assert not list(tmp_path.glob(".metrics.json.*"))  # the atomic write left no temporary file


def test_write_segmentation_scores_merges_labels_as_configured(tmp_path):
    _, _, _, paths = _blob(tmp_path)
    out = tmp_path / "segmentation.tsv"
    scores = write_segmentation_scores(paths["labels"], paths["labels"], out, settings={"merge_labels": {2: 1}})
    dice = pd.read_csv(out, sep="\t").set_index("structure")["dice"]
    assert list(dice.index) == list(scores["structure"])
    assert dice["white_matter"] == 1.0 and np.isnan(dice["ventricles"])  # label 2 merged into 1
