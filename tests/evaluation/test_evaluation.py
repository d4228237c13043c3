"""Evaluation protocols of the benchmark harness: linear probe against scikit-learn, choices on
validation only, hand-checked kNN, the few-label split, and fine-tuning with layer-wise lr decay."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from ssl_kit import evaluation as P
from ssl_kit.evaluation import FeatureSet
from ssl_kit.data.splits import few_label_split
from ssl_kit.inputs import InputSpec
from ssl_kit.models.backbones import backbone_spec, build_from_spec


def blobs(n: int, seed: int, classes: int = 4, dim: int = 16) -> FeatureSet:
    """Overlapping Gaussian blobs (about 90% separable), shifted and scaled away from standard."""
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % classes
    noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return FeatureSet(3.0 + 2.0 * (centers[labels] + 1.5 * noise), labels)


TRAIN, VAL, TEST = blobs(400, 1), blobs(200, 2), blobs(1000, 3)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_extract_keeps_order_and_restores_mode():
    backbone = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)).train()
    inputs = torch.randn(5, 3)
    loader = [(inputs[:2], torch.tensor([0, 1])), (inputs[2:], torch.tensor([1, 0, 1]))]
    features = P.extract(backbone, loader)
    assert backbone.training
    assert torch.allclose(features.features, backbone.eval()(inputs).detach())
    assert features.labels.tolist() == [0, 1, 1, 0, 1] and features.features.dtype == torch.float32


def test_linear_probe_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    strength = 1.0  # sklearn: C * sum(CE) + ||W||^2 / 2  ==  mean(CE) + wd ||W||^2 / 2 with wd = 1 / (C N)
    scaler = StandardScaler().fit(TRAIN.features.numpy())
    reference = LogisticRegression(C=strength, max_iter=10_000, tol=1e-8)
    reference.fit(scaler.transform(TRAIN.features.numpy()), TRAIN.labels.numpy())
    expected = reference.predict(scaler.transform(TEST.features.numpy()))

    (head,) = P.train_linear_heads(TRAIN, 4, [(0.1, 1 / (strength * len(TRAIN)))], batch_size=64)
    with torch.no_grad():
        predicted = head(TEST.features).argmax(1).numpy()
    labels = TEST.labels.numpy()
    assert abs((predicted == labels).mean() - (expected == labels).mean()) <= 0.015
    assert (predicted == expected).mean() >= 0.97
    # Both optima are class-centred (the L2 penalty picks the minimum-norm one): weights compare directly.
    assert np.abs(head[1].weight.detach().numpy() - reference.coef_).max() <= 0.1 * np.abs(reference.coef_).max()


def test_linear_probe_chooses_on_validation_only():
    result = P.linear_probe(TRAIN, VAL, TEST, 4, epochs=20, lrs=(0.001, 0.1, 3.0), weight_decays=(0.0, 0.1))
    assert result.val_top1 == max(acc for _, _, acc in result.val_grid) and len(result.val_grid) == 6
    assert result.test_top1 > 0.8 and result.num_train == len(TRAIN)
    shuffled = FeatureSet(TEST.features, TEST.labels[torch.randperm(len(TEST), generator=torch.Generator().manual_seed(0))])
    blind = P.linear_probe(TRAIN, VAL, shuffled, 4, epochs=20, lrs=(0.001, 0.1, 3.0), weight_decays=(0.0, 0.1))
    assert (blind.chosen, blind.val_top1, blind.val_grid) == (result.chosen, result.val_top1, result.val_grid)
    assert blind.test_top1 < 0.4  # the test labels did change; the choice did not


def test_linear_probe_does_not_depend_on_the_feature_scale():
    """Random-init ResNet features vary by ~1e-4 per dimension; a probe whose normalisation has a
    fixed epsilon sees them as constant."""

    def scaled(features: FeatureSet) -> FeatureSet:
        return FeatureSet(1e-4 * features.features, features.labels)

    settings = dict(epochs=20, lrs=(0.1,), weight_decays=(0.0,))
    result = P.linear_probe(TRAIN, VAL, TEST, 4, **settings)
    tiny = P.linear_probe(scaled(TRAIN), scaled(VAL), scaled(TEST), 4, **settings)
    assert result.test_top1 > 0.8 and abs(tiny.test_top1 - result.test_top1) <= 0.005


def test_knn_temperature_lets_a_closer_minority_beat_a_farther_majority():
    # Query (1, 0). Cosine similarities: class 0 at 1.0 (and -1.0, never a neighbour with k = 3),
    # class 1 twice at 0.8 (norms differ: cosine ignores them), class 2 at 0.6 and 0.0.
    bank = FeatureSet(
        torch.tensor([[2.0, 0.0], [4.0, 3.0], [0.8, -0.6], [3.0, 4.0], [0.0, 1.0], [-1.0, 0.0]]),
        torch.tensor([0, 1, 1, 2, 2, 0]),
    )
    query = FeatureSet(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    for temperature, winner in ((0.07, 0), (1.0, 1)):
        scores = P.knn_predict(query.features, bank.features, bank.labels, 3, k=3, temperature=temperature)[0]
        expected = [math.exp(1.0 / temperature), 2 * math.exp(0.8 / temperature), 0.0]
        assert scores.tolist() == pytest.approx(expected, rel=1e-4)
        assert P.knn(bank, query, 3, k=3, temperature=temperature) == float(winner == 0)


def test_few_label_probe_trains_on_the_self_training_split(monkeypatch):
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    train = FeatureSet(torch.randn(300, 8), (torch.arange(300) % 10)[order])
    seen = {}

    def probe(train, val, test, num_classes, **settings):
        seen.update(train=train, settings=settings)
        return P.ProbeResult(0.5, 0.5, {"lr": 0.1}, len(train), 0.0)

    monkeypatch.setattr("ssl_kit.evaluation.linear.linear_probe", probe)
    assert P.few_label(train, VAL, TEST, 10, labels_per_class=3, seed=7, epochs=5).chosen == {"lr": 0.1, "selection": "val"}
    labeled, _ = few_label_split(train.labels.numpy(), 3, None, 7)
    assert torch.equal(seen["train"].features, train.features[labeled])
    assert np.bincount(seen["train"].labels.numpy()).tolist() == [3] * 10
    assert seen["settings"] == {"seed": 7, "epochs": 5}
    monkeypatch.undo()
    assert P.few_label(TRAIN, VAL, TEST, 4, label_fraction=0.1, epochs=5).num_train == 40


def tiny_vit(depth: int, image_size: int = 8) -> nn.Module:
    return build_from_spec(backbone_spec("vit_tiny_patch16_224", InputSpec.image(image_size), extra_kwargs={"depth": depth, "embed_dim": 64, "num_heads": 2}))


def group_lr(groups: list[dict], param: torch.Tensor) -> float:
    (lr,) = [group["lr"] for group in groups if any(p is param for p in group["params"])]
    return lr


def test_layer_decay_lrs_for_vit_video_vit_and_resnet():
    head = nn.Linear(64, 10)
    vit = tiny_vit(depth=2)  # layers: embeddings 0, blocks 1-2, final norm and head 3
    groups = P.fine_tune_param_groups(vit, head, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    for param, lr in [(vit.pos_embed, 0.125), (vit.cls_token, 0.125), (vit.patch_embed.proj.weight, 0.125),
                      (vit.blocks[0].attn.qkv.weight, 0.25), (vit.blocks[1].mlp.fc2.bias, 0.5), (vit.norm.weight, 1.0),
                      (head.weight, 1.0)]:  # fmt: skip
        assert group_lr(groups, param) == pytest.approx(lr)
    assert sum(len(g["params"]) for g in groups) == len(list(vit.parameters())) + 2
    assert all(g["weight_decay"] == (0.05 if g["params"][0].ndim > 1 else 0.0) for g in groups)

    video = build_from_spec(backbone_spec("video_vit_tiny", InputSpec.video(4, 16), extra_kwargs={"depth": 2}))
    groups = P.fine_tune_param_groups(video, head, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    for param, lr in [(video.patch_embed.weight, 0.125), (video.pos_embed, 0.125), (video.blocks[1].norm1.weight, 0.5), (video.norm.bias, 1.0)]:
        assert group_lr(groups, param) == pytest.approx(lr)

    resnet = build_from_spec(backbone_spec("resnet18", InputSpec.image(8)))  # stem 0, layer1-4 1-4, head 5
    groups = P.fine_tune_param_groups(resnet, head, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    for param, lr in [(resnet.conv1.weight, 0.5**5), (resnet.bn1.bias, 0.5**5), (resnet.layer1[0].conv1.weight, 0.5**4),
                      (resnet.layer4[1].bn2.weight, 0.5), (head.bias, 1.0)]:  # fmt: skip
        assert group_lr(groups, param) == pytest.approx(lr)

    plain = P.fine_tune_param_groups(resnet, head, lr=0.3, weight_decay=0.05)
    assert [g["lr"] for g in plain] == [0.3, 0.3]
    with pytest.raises(ValueError, match="layer-wise lr decay knows"):
        P.fine_tune_param_groups(nn.Sequential(nn.Linear(2, 2)), head, 1.0, 0.0, layer_decay=0.5)


class KeepModel(L.Callback):
    def on_fit_start(self, trainer, pl_module) -> None:
        self.initial_head = pl_module.head.weight.detach().clone()

    def on_train_end(self, trainer, pl_module) -> None:
        self.model = pl_module


def test_fine_tune_starts_its_head_near_zero_with_head_init_std():
    from ssl_kit.data.image import DigitsDataModule

    keep = KeepModel()
    P.fine_tune(
        tiny_vit(depth=1), DigitsDataModule(image_size=8, batch_size=64, num_workers=0), 10, epochs=0, lr=3e-3, weight_decay=0.05,
        head_init_std=2e-5, trainer_kwargs={"accelerator": "cpu", "callbacks": [keep]},
    )  # fmt: skip
    assert 1e-5 < keep.initial_head.std().item() < 3e-5 and keep.initial_head.abs().max().item() <= 4e-5
    default = P.classifier_head(64, 10).weight
    assert default.std().item() > 1e-2  # PyTorch's default init: uniform within 1/sqrt(64)
    with pytest.raises(ValueError, match="head_init_std must be positive"):
        P.classifier_head(64, 10, init_std=-1.0)


@pytest.mark.slow
def test_fine_tune_trains_a_copy_of_the_backbone_above_chance():
    from ssl_kit.data.image import DigitsDataModule

    L.seed_everything(0, verbose=False)
    backbone = tiny_vit(depth=1)
    before = {name: value.clone() for name, value in backbone.state_dict().items()}
    keep = KeepModel()
    accuracy = P.fine_tune(
        backbone, DigitsDataModule(image_size=8, batch_size=64, num_workers=0), 10, epochs=3, lr=3e-3, weight_decay=0.05,
        layer_decay=0.75, trainer_kwargs={"accelerator": "cpu", "callbacks": [keep]},
    )  # fmt: skip
    print(f"fine-tuned 1-block ViT, 3 epochs: test top-1 {accuracy:.3f}")
    assert accuracy > 0.5, accuracy  # chance: 0.1
    tuned = keep.model.backbone.state_dict()
    assert all(torch.equal(value, backbone.state_dict()[name]) for name, value in before.items())
    assert not torch.equal(tuned["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    assert not torch.equal(tuned["pos_embed"], before["pos_embed"])
