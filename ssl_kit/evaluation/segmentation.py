"""Linear segmentation probe (DINOv2's dense protocol) on the embedded digit scenes
(``ssl_kit.data.segmentation``): a frozen backbone's features at every location (a ViT's patch
tokens on its grid, a CNN's last feature map before pooling) feed a linear (1x1 conv) classifier,
trained with cross-entropy against the masks downsampled to the feature grid (nearest pixel, as
label maps are resized); its logits, bilinearly upsampled to the mask size, give the predicted
mask, scored by mIoU. Learning rate and weight decay are chosen on val; the chosen head scores
test once."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassJaccardIndex
from torchvision.transforms.functional import normalize

from ssl_kit.data.segmentation import NUM_SCENE_CLASSES, Scenes, digit_scene_splits
from ssl_kit.evaluation.features import FeatureSet, extract
from ssl_kit.evaluation.linear import PROBE_LRS, PROBE_WEIGHT_DECAYS, probe_grid, train_linear_heads
from ssl_kit.inputs import InputSpec
from ssl_kit.models.tokens import ImageViTTokens


@dataclass
class DenseSet:
    """One split's per-location features ``(N, D, h, w)`` and its masks ``(N, H, W)``."""

    features: Tensor
    masks: Tensor


@dataclass
class SegmentationResult:
    """Test mIoU of the head chosen on val, its val mIoU, the chosen ``lr`` / ``weight_decay`` and
    the val mIoU of every setting tried."""

    test_miou: float
    val_miou: float
    chosen: dict[str, float]
    wall_time_s: float
    val_grid: list[tuple[float, float, float]] = field(default_factory=list)  # (lr, weight_decay, val_miou)


def mean_iou_metric(num_classes: int) -> MulticlassJaccardIndex:
    """mIoU as segmentation benchmarks define it: per class, the intersection over the union of its
    predicted and true pixels summed over the whole set (not per image), averaged over the classes
    present in the prediction or the target; a class absent from both is left out of the mean."""
    return MulticlassJaccardIndex(num_classes, average="macro", validate_args=False)


def spatial_features(backbone: nn.Module, images: Tensor) -> Tensor:
    """``(B, D, h, w)``: a timm ViT's final patch tokens on its patch grid (class and register
    tokens dropped), read through ``models.tokens``; any other backbone's ``forward_features`` map
    (a timm ResNet's last stage, before pooling)."""
    if isinstance(backbone, VisionTransformer):
        vit = ImageViTTokens(backbone)
        patches = vit.tokens(images)[:, vit.num_prefix_tokens :]
        return patches.transpose(1, 2).unflatten(2, vit.grid)
    maps = backbone.forward_features(images) if hasattr(backbone, "forward_features") else None
    if maps is None or maps.ndim != 4:
        raise TypeError(
            "the segmentation probe needs an image ViT (patch tokens) or a CNN whose forward_features gives a "
            f"(B, C, h, w) map, got {type(backbone).__name__}"
        )
    return maps


class FlatDenseFeatures(nn.Module):
    """``spatial_features`` of uint8 images, normalised as the backbone's training data was,
    flattened to one row per image so ``extract`` carries them (eval mode, the backbone's device);
    ``shape`` keeps ``(D, h, w)`` to unflatten them."""

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.backbone, self.mean, self.std = backbone, list(mean), list(std)
        self.shape: tuple[int, ...] = ()

    def forward(self, images: Tensor) -> Tensor:
        maps = spatial_features(self.backbone, normalize(images.float() / 255, self.mean, self.std))
        self.shape = tuple(maps.shape[1:])
        return maps.flatten(1)


def dense_features(backbone: nn.Module, scenes: Scenes, input_spec: InputSpec, batch_size: int = 256) -> DenseSet:
    """The per-location features of every scene, in order, with their masks."""
    network = FlatDenseFeatures(backbone, input_spec.mean, input_spec.std)
    flat = extract(network, DataLoader(TensorDataset(scenes.images, scenes.masks), batch_size=batch_size))
    return DenseSet(flat.features.unflatten(1, network.shape), flat.labels)


def location_rows(features: Tensor) -> Tensor:
    """``(N, D, h, w)`` -> one row per location, ``(N * h * w, D)``, image by image, row-major."""
    return features.permute(0, 2, 3, 1).flatten(0, 2)


def location_labels(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """The masks downsampled to the feature grid, one label per location in ``location_rows``
    order: the class of the pixel at each location's centre (``nearest-exact``), so each class
    keeps its share of the labels, which a majority vote over thin strokes would give to the background."""
    return F.interpolate(masks[:, None].float(), size=tuple(grid), mode="nearest-exact").long().flatten()


@torch.no_grad()
def probe_miou(head: nn.Module, dense: DenseSet, num_classes: int, chunk: int = 64) -> float:
    """mIoU of the masks a per-location head predicts: its logits upsampled bilinearly to the mask
    size, then the most likely class per pixel."""
    metric = mean_iou_metric(num_classes)
    for features, masks in zip(dense.features.split(chunk), dense.masks.split(chunk)):
        count, _, height, width = features.shape
        logits = head(location_rows(features)).view(count, height, width, num_classes).permute(0, 3, 1, 2)
        metric.update(F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False).argmax(1), masks)
    return float(metric.compute())


@torch.no_grad()
def segmentation_probe(
    train: DenseSet,
    val: DenseSet,
    test: DenseSet,
    num_classes: int,
    *,
    epochs: int = 30,
    batch_size: int = 1024,
    lrs: Sequence[float] = PROBE_LRS,
    weight_decays: Sequence[float] = PROBE_WEIGHT_DECAYS,
    batchnorm: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> SegmentationResult:
    """Every ``lrs`` x ``weight_decays`` head trained at once on ``train``'s locations
    (``train_linear_heads``: SGD, cosine lr, the features standardised); the head with the
    best ``val`` mIoU (the first on ties) is scored once on ``test``, which plays no part in the choice."""
    start = time.perf_counter()
    settings = probe_grid(lrs, weight_decays)
    locations = FeatureSet(location_rows(train.features), location_labels(train.masks, train.features.shape[-2:]))
    heads = train_linear_heads(
        locations, num_classes, settings, epochs=epochs, batch_size=batch_size, batchnorm=batchnorm, seed=seed, device=device
    )
    val_miou = [probe_miou(head, val, num_classes) for head in heads]
    best = int(np.argmax(val_miou))
    return SegmentationResult(
        test_miou=probe_miou(heads[best], test, num_classes),
        val_miou=val_miou[best],
        chosen={"lr": settings[best][0], "weight_decay": settings[best][1]},
        wall_time_s=time.perf_counter() - start,
        val_grid=[(lr, wd, miou) for (lr, wd), miou in zip(settings, val_miou)],
    )


def linear_segmentation(
    backbone: nn.Module,
    input_spec: InputSpec,
    *,
    image_size: int | None = None,
    train_scenes: int = 1000,
    val_scenes: int = 250,
    test_scenes: int = 500,
    generator_seed: int = 0,
    epochs: int = 30,
    batch_size: int = 1024,
    lrs: Sequence[float] = PROBE_LRS,
    weight_decays: Sequence[float] = PROBE_WEIGHT_DECAYS,
    seed: int = 0,
) -> SegmentationResult:
    """The harness's ``segmentation`` protocol: ``segmentation_probe`` on the embedded digit scenes
    (``digit_scene_splits`` of ``generator_seed``), normalised as the backbone's training data was,
    of side ``image_size``: by default the backbone's input side, which a ViT needs; a CNN takes any,
    and its last stage (stride 8 with the small-image stem) wants 32 px or more for a useful 4x4 map.
    Features are extracted in this process, on the backbone's device (every DDP rank repeats it)."""
    if input_spec.modality != "image" or input_spec.channels != 3 or input_spec.height != input_spec.width or input_spec.mean is None:
        raise ValueError(
            "the segmentation probe draws square, normalised RGB images; this backbone takes "
            f"{input_spec.modality} input of {input_spec.channels} channel(s), shape {tuple(input_spec.shape)}, mean {input_spec.mean}"
        )
    side = image_size or input_spec.side
    scenes = digit_scene_splits(side, train=train_scenes, val=val_scenes, test=test_scenes, seed=generator_seed)
    dense = {split: dense_features(backbone, part, input_spec) for split, part in scenes.items()}
    return segmentation_probe(
        dense["train"], dense["val"], dense["test"], NUM_SCENE_CLASSES, epochs=epochs, batch_size=batch_size,
        lrs=lrs, weight_decays=weight_decays, seed=seed, device=next(backbone.parameters()).device,
    )  # fmt: skip
