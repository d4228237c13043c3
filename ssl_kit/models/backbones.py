"""timm backbones by name, with small-image variants and their feature dimension exposed."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import timm

import ssl_kit.models.resnet  # noqa: F401 - registers the narrow ResNets with timm
import ssl_kit.models.video  # noqa: F401 - registers the video ViTs with timm
from torch import nn

from ssl_kit.inputs import InputSpec

#: Images at or below this side use the small-image variant (CIFAR stem / small ViT patches).
SMALL_IMAGE_MAX = 64


def small_patch_size(side: int) -> int:
    """ViT patch side for small images: 4 px at 32 px (8x8 tokens), 8 px at 64 px."""
    return 4 if side <= 32 else 8


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild a backbone: timm's model name and keyword arguments, and whether
    ssl_kit swaps in the small-image ResNet stem. Exports keep it as JSON beside the weights."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    cifar_stem: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> BackboneSpec:
        saved = json.loads(text)
        return cls(saved["name"], saved.get("kwargs", {}), bool(saved.get("cifar_stem", False)))


def backbone_spec(
    name: str,
    input_spec: InputSpec,
    small_image: bool | None = None,
    extra_kwargs: dict[str, Any] | None = None,
    zero_init_last: bool = False,
) -> BackboneSpec:
    """The ``BackboneSpec`` of ``name`` for ``input_spec``: timm's kwargs, plus the stem change.

    ViTs get the input's grid (``img_size``; video: ``num_frames`` too) and, for small inputs
    (side <= 64 unless ``small_image`` says otherwise), small patches; ResNets the CIFAR stem
    instead; inputs of other than 3 channels (spectrograms) set ``in_chans``.
    ``extra_kwargs`` go to ``timm.create_model`` and win over the defaults chosen here (e.g.
    ``drop_rate``, ``drop_path_rate``, ``patch_size``).

    ``zero_init_last`` (ResNets): timm's zero init of each block's last BatchNorm, which leaves a
    random ResNet passing only its shortcuts. Off by default, as in torchvision's ResNets (which
    lightly and solo-learn train): a better start for self-supervised learning (MNIST, 78 SimCLR
    steps: linear probe 0.963 vs 0.945) and no strawman random-init baseline. Supervised training
    from few labels wants it on (``MeanTeacher``)."""
    small = input_spec.side <= SMALL_IMAGE_MAX if small_image is None else small_image
    kwargs: dict[str, Any] = {"num_classes": 0}
    if input_spec.channels != 3:
        kwargs["in_chans"] = input_spec.channels
    cifar_stem = False
    if input_spec.modality == "video":
        if not name.startswith("video_vit"):
            raise ValueError(f"video input needs a video backbone (video_vit_tiny, video_vit_small, ...), got {name}")
        kwargs.update(img_size=input_spec.height, num_frames=input_spec.frames)
        if small:
            kwargs["patch_size"] = small_patch_size(input_spec.height)
    elif name.startswith(("vit", "deit")):
        kwargs["img_size"] = input_spec.side if input_spec.height == input_spec.width else (input_spec.height, input_spec.width)
        if small:
            kwargs["patch_size"] = small_patch_size(input_spec.side)
    elif name.startswith(("resnet", "resnext", "wide_resnet")):
        cifar_stem = small
        kwargs["zero_init_last"] = zero_init_last
    kwargs.update(extra_kwargs or {})
    return BackboneSpec(name, kwargs, cifar_stem)


def build_from_spec(spec: BackboneSpec, pretrained: bool = False) -> nn.Module:
    """The backbone a spec describes; ``pretrained`` loads timm's weights (downloads them once)."""
    model = timm.create_model(spec.name, pretrained=pretrained, **spec.kwargs)
    if spec.cifar_stem:
        # 3x3 stride-1 first conv and no max-pool: the standard ResNet stem for 32 px images.
        in_chans = spec.kwargs.get("in_chans", 3)
        model.conv1 = nn.Conv2d(in_chans, model.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def create_backbone(name: str, input_spec: InputSpec, small_image: bool | None = None) -> nn.Module:
    """A timm model returning pooled features; ``model.num_features`` is the feature dimension.

    ``small_image`` (default: side <= 64) swaps ResNets to the CIFAR stem and gives ViTs
    4 px (32 px images) or 8 px patches.
    """
    return build_from_spec(backbone_spec(name, input_spec, small_image))
