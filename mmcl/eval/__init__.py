"""Zero-shot classification and retrieval evaluation."""

from mmcl.eval.metrics import classification_metrics, recall_at_k
from mmcl.eval.zeroshot import evaluate_dataset

__all__ = ["classification_metrics", "evaluate_dataset", "recall_at_k"]
