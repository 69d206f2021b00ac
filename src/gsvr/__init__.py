"""gsvr: slice-to-volume reconstruction with 3D Gaussian primitives and an exact analytic PSF."""

from gsvr.errors import GsvrError
from gsvr.io import Stack, load_stacks
from gsvr.recon.config import ReconConfig
from gsvr.recon.engine import Result, reconstruct

__version__ = "0.1.0"
__all__ = ["GsvrError", "ReconConfig", "Result", "Stack", "load_stacks", "reconstruct", "__version__"]
