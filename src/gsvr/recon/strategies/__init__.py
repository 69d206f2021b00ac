"""Optional components of the joint stage as strategies with hooks the loop calls (gsplat's pattern):
the progressive grid, 3DGS density control and the neural residual field."""

from gsvr.recon.strategies.base import Strategy
from gsvr.recon.strategies.densify import Densify
from gsvr.recon.strategies.progressive import Progressive
from gsvr.recon.strategies.residual_field import ResidualFieldStrategy

__all__ = ["Densify", "Progressive", "ResidualFieldStrategy", "Strategy"]
