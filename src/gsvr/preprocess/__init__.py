"""Preprocessing of acquired stacks: crop to the mask, N4 bias-field correction, intensity standardisation."""

from gsvr.preprocess.stacks import (PreprocessConfig, crop_to_mask, dilate_masks_inplane, n4_bias_correction, preprocess_stacks,
                                    standardise_intensities)

__all__ = ["PreprocessConfig", "crop_to_mask", "dilate_masks_inplane", "n4_bias_correction", "preprocess_stacks", "standardise_intensities"]
