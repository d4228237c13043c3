"""Backbones, parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_kit.methods import BarlowTwins
from ssl_kit.models import create_backbone
from ssl_kit.optim import build_optimizer, decay_groups, warmup_cosine


@pytest.mark.parametrize(
    "name, image_size, patch, features",
    [("vit_tiny_patch16_224", 32, 4, 192), ("vit_tiny_patch16_224", 64, 8, 192), ("vit_small_patch16_224", 96, 16, 384)],
)
def test_vit_patch_size_follows_image_size(name, image_size, patch, features):
    model = create_backbone(name, image_size)
    assert model.patch_embed.patch_size == (patch, patch)
    assert model.num_features == features
    assert model(torch.zeros(2, 3, image_size, image_size)).shape == (2, features)


@pytest.mark.parametrize("name, features", [("resnet18", 512), ("resnet50", 2048)])
def test_resnet_small_image_stem_and_feature_dim(name, features):
    small = create_backbone(name, 32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert small.num_features == features
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, features)
    standard = create_backbone(name, 224)
    assert standard.conv1.kernel_size == (7, 7)
    assert create_backbone(name, 32, small_image=False).conv1.kernel_size == (7, 7)


def test_decay_groups_exclude_biases_and_norms():
    model = BarlowTwins(backbone="resnet18", image_size=32, num_classes=10)
    decay, no_decay = decay_groups(model.trained_modules(), weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "backbone.bn1.weight" in no_decay_names and "backbone.bn1.bias" in no_decay_names
    assert "projector.layers.0.weight" not in no_decay_names
    covered = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert covered == {id(p) for m in model.trained_modules() for p in m.parameters()}
    assert not covered & {id(p) for p in model.probe.parameters()}


def test_lars_skips_adaptation_for_groups_without_weight_decay():
    weight = torch.nn.Parameter(torch.ones(4, 4))
    bias = torch.nn.Parameter(torch.ones(4))
    optimizer = build_optimizer("lars", [{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}], lr=1.0, momentum=0.0)
    weight.grad = torch.full_like(weight, 1.0)
    bias.grad = torch.full_like(bias, 1.0)
    optimizer.step()
    assert torch.allclose(bias, torch.zeros(4))  # plain SGD step of lr * grad
    assert not torch.allclose(weight, torch.zeros(4, 4))  # trust ratio scaled the step


def test_warmup_cosine_values():
    warmup, total = 10, 110
    assert warmup_cosine(0, warmup, total) == pytest.approx(0.1)
    assert warmup_cosine(9, warmup, total) == pytest.approx(1.0)
    assert warmup_cosine(10, warmup, total) == pytest.approx(1.0)
    assert warmup_cosine(60, warmup, total) == pytest.approx(0.5)
    assert warmup_cosine(110, warmup, total) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(35, warmup, total, final_fraction=0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))
    )
