"""Optimisation, the training step and the training loop."""
