"""Evaluation of learned features: extraction (one process or every DDP rank; multi-view testing;
every block of a ViT), kNN, linear probes (multi-label, weighted-layer, few-label), fine-tuning and
the linear segmentation probe. The online monitors, the benchmark harness and Noisy Student all use these."""

from ssl_kit.evaluation.features import BlockFeatures, FeatureSet, extract, extract_datasets, extract_splits, mean_average_precision, per_view, score, top1
from ssl_kit.evaluation.fine_tune import classifier_head, fine_tune, fine_tune_param_groups, layer_ids, stage_prefixes
from ssl_kit.evaluation.knn import knn, knn_predict
from ssl_kit.evaluation.linear import PROBE_LRS, PROBE_WEIGHT_DECAYS, ProbeResult, cross_validated_probe, few_label, linear_probe, train_linear_heads
from ssl_kit.evaluation.segmentation import SegmentationResult, linear_segmentation, mean_iou_metric, segmentation_probe

__all__ = [
    "BlockFeatures", "FeatureSet", "extract", "extract_datasets", "extract_splits", "mean_average_precision", "per_view", "score", "top1",
    "classifier_head", "fine_tune", "fine_tune_param_groups", "layer_ids", "stage_prefixes",
    "knn", "knn_predict",
    "PROBE_LRS", "PROBE_WEIGHT_DECAYS", "ProbeResult", "cross_validated_probe", "few_label", "linear_probe", "train_linear_heads",
    "SegmentationResult", "linear_segmentation", "mean_iou_metric", "segmentation_probe",
]  # fmt: skip
