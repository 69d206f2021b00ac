"""Stateless numerical core: PSF covariance, neighbour search, the Gaussian forward model."""
