"""gsvr: slice-to-volume reconstruction with 3D Gaussian primitives and an analytic Gaussian PSF.

The reconstruction names are imported on first use, so the I/O, preprocessing and evaluation
modules (and the workflow's evaluation environment) do not need torch.
"""

from gsvr.errors import GsvrError
from gsvr.io import Stack, load_stacks

__version__ = "0.2.0"
__all__ = ["GsvrError", "ReconConfig", "Result", "Stack", "load_stacks", "reconstruct", "__version__"]

_LAZY = {"ReconConfig": "gsvr.recon.config", "Result": "gsvr.recon.engine", "reconstruct": "gsvr.recon.engine"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gsvr' has no attribute {name!r}")
