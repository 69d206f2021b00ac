"""NIfTI input and output: stacks, masks and volumes in world space (RAS+ mm)."""

from gsvr.io.nifti import Stack, load_image, load_stack, load_stacks, save_volume, atomic_output

__all__ = ["Stack", "load_image", "load_stack", "load_stacks", "save_volume", "atomic_output"]
