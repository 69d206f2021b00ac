"""Baseline reconstruction methods run side by side with the Gaussian engine.

The reconstruction functions are imported on first use, so :mod:`gsvr.baselines.external` (which the workflow
imports on every parse) does not need torch.
"""

__all__ = ["reconstruct_classic", "reconstruct_stack_average"]

_LAZY = {"reconstruct_classic": "gsvr.baselines.svr_classic", "reconstruct_stack_average": "gsvr.baselines.stack_average"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gsvr.baselines' has no attribute {name!r}")
