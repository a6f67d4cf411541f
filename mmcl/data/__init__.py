"""Streaming shards into typed batches."""

from mmcl.data.batch import Batch
from mmcl.data.pipeline import (
    InputSpec,
    TrainStream,
    batches_from_samples,
    build_eval_loader,
    check_data_config,
    held_out_batches,
)
from mmcl.data.shards import expand_urls, read_sizes

__all__ = [
    "Batch",
    "InputSpec",
    "TrainStream",
    "batches_from_samples",
    "build_eval_loader",
    "check_data_config",
    "held_out_batches",
    "expand_urls",
    "read_sizes",
]
