"""Backbones, parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ssl_kit.inputs import InputSpec
from ssl_kit.methods import BarlowTwins
from ssl_kit.models import create_backbone
from ssl_kit.optim import build_optimizer, decay_groups, warmup_cosine


@pytest.mark.parametrize(
    "name, image_size, patch, features",
    [("vit_tiny_patch16_224", 32, 4, 192), ("vit_tiny_patch16_224", 64, 8, 192), ("vit_small_patch16_224", 96, 16, 384)],
)
def test_vit_patch_size_follows_image_size(name, image_size, patch, features):
    model = create_backbone(name, InputSpec.image(image_size))
    assert model.patch_embed.patch_size == (patch, patch)
    assert model.num_features == features
    assert model(torch.zeros(2, 3, image_size, image_size)).shape == (2, features)


@pytest.mark.parametrize("name, features", [("resnet18", 512), ("resnet50", 2048)])
def test_resnet_small_image_stem_and_feature_dim(name, features):
    small = create_backbone(name, InputSpec.image(32))
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert small.num_features == features
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, features)
    standard = create_backbone(name, InputSpec.image(224))
    assert standard.conv1.kernel_size == (7, 7)
    assert create_backbone(name, InputSpec.image(32), small_image=False).conv1.kernel_size == (7, 7)


def test_decay_groups_exclude_biases_and_norms():
    model = BarlowTwins(backbone="resnet18", input_spec=InputSpec.image(32), num_classes=10)
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


def configured_optimizer(model) -> torch.optim.Optimizer:
    """``configure_optimizers`` outside a fit: a trainer of one 10-step epoch."""
    model._trainer = SimpleNamespace(estimated_stepping_batches=10, train_dataloader=[], num_training_batches=10, accumulate_grad_batches=1)
    try:
        return model.configure_optimizers()["optimizer"]
    finally:
        model._trainer = None


def test_lars_without_weight_decay_is_refused():
    """lightly's LARS adapts only parameters with weight decay: at 0 it would silently be SGD."""
    model = BarlowTwins(backbone="resnet18", input_spec=InputSpec.image(8), optimizer="lars", weight_decay=0.0)
    with pytest.raises(ValueError, match="lars.*weight_decay 0"):
        configured_optimizer(model)


def test_barlow_twins_trains_biases_and_norms_at_the_official_share_of_the_rate():
    """Official Barlow Twins: weights at 0.2, biases and BatchNorm parameters at 0.0048 (x batch/256)."""
    model = BarlowTwins(backbone="resnet18", input_spec=InputSpec.image(8), lr=0.5, optimizer="lars", weight_decay=1.5e-6)
    decay, no_decay, probe = configured_optimizer(model).param_groups
    assert decay["initial_lr"] == 0.5 and no_decay["initial_lr"] == pytest.approx(0.5 * 0.0048 / 0.2)
    assert no_decay["weight_decay"] == 0.0 and probe["initial_lr"] == model.hparams.probe_lr
    assert all(p.ndim == 1 for p in no_decay["params"]) and all(p.ndim > 1 for p in decay["params"])
    plain = BarlowTwins(backbone="resnet18", input_spec=InputSpec.image(8), lr=0.5, bias_lr_scale=1.0)
    assert configured_optimizer(plain).param_groups[1]["initial_lr"] == 0.5


@pytest.mark.parametrize("world_size, device, converted", [(2, "cuda", True), (1, "cuda", False), (2, "cpu", False)])
def test_barlow_twins_and_moco_v3_synchronise_batchnorm_under_ddp_on_gpus(world_size, device, converted):
    """The official Barlow Twins and MoCo v3 convert to SyncBatchNorm; here on CUDA under DDP
    (torch's SyncBatchNorm does not run on CPU gloo ranks). SimCLR keeps its BatchNorms."""
    from ssl_kit.methods import MoCoV3, SimCLR

    trainer = SimpleNamespace(world_size=world_size, strategy=SimpleNamespace(root_device=torch.device(device)))
    for method, wanted in [(BarlowTwins, converted), (MoCoV3, converted), (SimCLR, False)]:
        model = method(backbone="resnet18", input_spec=InputSpec.image(8), projection_hidden_dim=16, projection_dim=8)
        model._trainer = trainer
        model.setup("fit")
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) == wanted for m in norms), method.__name__
        if wanted:  # the EMA pairs still point at the model's own (converted) modules
            for target, online in getattr(model, "ema", SimpleNamespace(pairs=[])).pairs:
                assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in online.modules())
                assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in target.modules())
