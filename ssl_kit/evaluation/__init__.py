"""Evaluation of learned features: extraction (one process or every DDP rank), kNN, linear probes
and fine-tuning. The online monitors, the benchmark harness and Noisy Student all use these."""

from ssl_kit.evaluation.features import FeatureSet, extract, extract_datasets, extract_splits, top1
from ssl_kit.evaluation.fine_tune import fine_tune, fine_tune_param_groups, layer_ids, stage_prefixes
from ssl_kit.evaluation.knn import knn, knn_predict
from ssl_kit.evaluation.linear import PROBE_LRS, PROBE_WEIGHT_DECAYS, ProbeResult, few_label, linear_probe, train_linear_heads

__all__ = [
    "FeatureSet", "extract", "extract_datasets", "extract_splits", "top1",
    "fine_tune", "fine_tune_param_groups", "layer_ids", "stage_prefixes",
    "knn", "knn_predict",
    "PROBE_LRS", "PROBE_WEIGHT_DECAYS", "ProbeResult", "few_label", "linear_probe", "train_linear_heads",
]  # fmt: skip
