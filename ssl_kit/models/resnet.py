"""Narrow ResNets for small images on small compute budgets, registered with timm."""

from __future__ import annotations

from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet

from ssl_kit.models.registry import architecture_kwargs


@register_model
def resnet18_slim(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 with half-width stages: 32-64-128-256 channels after the 64-channel stem (a 256-d feature), about a quarter of ResNet-18's
    FLOPs. With the CIFAR stem (images of 64 px and below) it is the fast CIFAR backbone of the
    short CPU budgets (``configs/*_cifar10_cpu.yaml``)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), channels=(32, 64, 128, 256), **architecture_kwargs("resnet18_slim", pretrained, kwargs))
