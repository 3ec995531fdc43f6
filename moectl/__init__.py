"""moectl: train Mixture-of-Experts models with pluggable parallel strategies."""

__version__ = "0.1.0"
