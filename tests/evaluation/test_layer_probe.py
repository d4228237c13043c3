"""The weighted-layer linear probe (SUPERB's learned softmax weights over every block's features):
with one-hot layer weights it is the plain probe of that layer, and learning the weights finds
the one layer that carries the label; ``BlockFeatures`` reads every block of image and video ViTs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_kit import evaluation as P
from ssl_kit.bench import runner
from ssl_kit.evaluation import BlockFeatures, FeatureSet
from ssl_kit.inputs import InputSpec
from ssl_kit.models.backbones import backbone_spec, build_from_spec

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, INFORMATIVE = 4, 2


def layered(n: int, seed: int, classes: int = 4, dim: int = 8) -> FeatureSet:
    """Every-layer features ``(n, LAYERS, dim)`` of pure noise, but for layer ``INFORMATIVE``,
    which adds class centres; layers are scaled differently, as real blocks are."""
    centers = 2.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % classes
    features = torch.randn(n, LAYERS, dim, generator=torch.Generator().manual_seed(seed))
    features[:, INFORMATIVE] += centers[labels]
    return FeatureSet(features * torch.tensor([1.0, 5.0, 0.5, 3.0]).view(1, -1, 1), labels)


TRAIN, VAL, TEST = layered(200, 1), layered(100, 2), layered(200, 3)
SETTINGS = dict(epochs=20, lrs=(0.03, 0.3), weight_decays=(0.0, 1e-3))


def layer(features: FeatureSet, index: int) -> FeatureSet:
    return FeatureSet(features.features[:, index].clone(), features.labels)


@pytest.mark.parametrize("index", [0, INFORMATIVE])
def test_one_hot_layer_weights_equal_the_plain_probe_of_that_layer(index):
    one_hot = [float(i == index) for i in range(LAYERS)]
    weighted = P.linear_probe(TRAIN, VAL, TEST, 4, layer_weights=one_hot, **SETTINGS)
    plain = P.linear_probe(layer(TRAIN, index), layer(VAL, index), layer(TEST, index), 4, **SETTINGS)
    assert [setting[:2] for setting in weighted.val_grid] == [setting[:2] for setting in plain.val_grid]
    assert [acc for *_, acc in weighted.val_grid] == pytest.approx([acc for *_, acc in plain.val_grid])
    assert weighted.test_top1 == pytest.approx(plain.test_top1)
    assert weighted.chosen == {**plain.chosen, "layer_weights": one_hot}
    settings = [(0.3, 1e-3)]
    (weighted_head,), (plain_head,) = (
        P.train_linear_heads(TRAIN, 4, settings, epochs=20, layer_weights=one_hot),
        P.train_linear_heads(layer(TRAIN, index), 4, settings, epochs=20),
    )
    with torch.no_grad():
        assert torch.allclose(weighted_head(TEST.features), plain_head(layer(TEST, index).features), atol=1e-5)
    assert torch.allclose(weighted_head[-1].weight, plain_head[-1].weight, atol=1e-6)


def test_learned_layer_weights_pick_the_layer_that_carries_the_label():
    learned = P.linear_probe(TRAIN, VAL, TEST, 4, **SETTINGS)
    weights = learned.chosen["layer_weights"]
    assert max(range(LAYERS), key=weights.__getitem__) == INFORMATIVE and weights[INFORMATIVE] > 0.5
    assert sum(weights) == pytest.approx(1.0, abs=1e-3)
    uniform = P.linear_probe(TRAIN, VAL, TEST, 4, layer_weights=[1 / LAYERS] * LAYERS, **SETTINGS)
    best_single = P.linear_probe(layer(TRAIN, INFORMATIVE), layer(VAL, INFORMATIVE), layer(TEST, INFORMATIVE), 4, **SETTINGS)
    assert learned.test_top1 > uniform.test_top1 + 0.15  # the noise layers drown the label at fixed uniform weights
    assert learned.test_top1 >= best_single.test_top1 - 0.03


def test_layer_weights_must_match_the_features():
    with pytest.raises(ValueError, match="layer_weights has 2 weights"):
        P.train_linear_heads(TRAIN, 4, [(0.1, 0.0)], epochs=1, layer_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="layer_weights"):
        P.train_linear_heads(layer(TRAIN, 0), 4, [(0.1, 0.0)], epochs=1, layer_weights=[1.0])


def test_block_features_of_image_and_video_vits_end_with_the_backbone_output():
    torch.manual_seed(0)
    vit = build_from_spec(backbone_spec("vit_tiny_patch16_224", InputSpec.image(8), extra_kwargs={"depth": 3, "embed_dim": 32, "num_heads": 2}))
    video = build_from_spec(backbone_spec("video_vit_tiny", InputSpec.video(4, 16), extra_kwargs={"depth": 2}))
    for backbone, inputs, depth in ((vit.eval(), torch.randn(2, 3, 8, 8), 3), (video.eval(), torch.randn(2, 3, 4, 16, 16), 2)):
        with torch.no_grad():
            blocks = BlockFeatures(backbone)(inputs)
            output = backbone(inputs)
        assert blocks.shape == (2, depth, output.shape[-1])
        assert torch.allclose(blocks[:, -1], output, atol=1e-5)
        assert not torch.allclose(blocks[:, 0], blocks[:, -1], atol=1e-3)
    with pytest.raises(TypeError, match="ViT backbone"):
        BlockFeatures(nn.Linear(3, 3))


def test_the_harness_runs_the_linear_probe_on_every_block_for_layer_weighted_linear():
    assert runner.FROZEN_FEATURE_PROTOCOLS["layer_weighted_linear"] is runner.FROZEN_FEATURE_PROTOCOLS["linear"]
    assert runner.PROTOCOL_FEATURES["layer_weighted_linear"] is BlockFeatures and "linear" not in runner.PROTOCOL_FEATURES
    assert "layer_weighted_linear" in runner.KNOWN_PROTOCOLS
