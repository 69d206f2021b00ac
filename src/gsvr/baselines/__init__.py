"""Baseline reconstruction methods run side by side with the Gaussian engine."""

from gsvr.baselines.stack_average import reconstruct_stack_average
from gsvr.baselines.svr_classic import reconstruct_classic

__all__ = ["reconstruct_classic", "reconstruct_stack_average"]
