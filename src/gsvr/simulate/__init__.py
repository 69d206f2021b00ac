"""Simulated acquisitions from a ground-truth volume."""

from gsvr.simulate.stacks import SimulationConfig, simulate_stacks

__all__ = ["SimulationConfig", "simulate_stacks"]
