"""Saving, finding and loading checkpoints."""
