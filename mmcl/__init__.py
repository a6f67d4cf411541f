"""mmcl: multimodal contrastive pretraining from shards to zero-shot scores."""

__version__ = "0.1.0"
