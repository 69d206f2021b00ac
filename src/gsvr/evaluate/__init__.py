"""Reconstruction vs ground truth."""

from gsvr.evaluate.metrics import EvaluationResult, evaluate_files, evaluate_volume

__all__ = ["EvaluationResult", "evaluate_files", "evaluate_volume"]
