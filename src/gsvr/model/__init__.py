"""The Gaussian field and its initialisation."""

from gsvr.model.field import GaussianField

__all__ = ["GaussianField"]
