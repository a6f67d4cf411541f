"""LOSSES: loss modules by config name; each is built from LossConfig and shares one call shape:
`loss_fn(embeddings: {modality: (B, D)}, logit_scale) -> {"loss": scalar, <part>: scalar, ...}`."""

from mmcl.registry import Registry

LOSSES: Registry = Registry("loss")
