"""Zero-shot classification, linear probe and retrieval evaluation, and its reports."""

from mmcl.eval.metrics import classification_metrics, recall_at_k
from mmcl.eval.suite import evaluate_all
from mmcl.eval.zeroshot import evaluate_dataset

__all__ = ["classification_metrics", "evaluate_all", "evaluate_dataset", "recall_at_k"]
