"""Rigid transforms and affines (world = RAS+ millimetres, float64 where it matters)."""

from gsvr.geometry.transforms import (
    axis_angle_to_matrix,
    euler_to_matrix,
    matrix_to_axis_angle,
    quaternion_to_matrix,
)

__all__ = ["axis_angle_to_matrix", "euler_to_matrix", "matrix_to_axis_angle", "quaternion_to_matrix"]
