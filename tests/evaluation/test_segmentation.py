"""Linear segmentation probe: mIoU against a hand-computed example, the embedded digit scenes
(deterministic, masks exactly where the ink was drawn), spatial features of ViTs and ResNets, the
probe's choice on val only, and that it learns: above predicting the background with a tiny random
ViT, and (slow) higher after a short SimCLR run than at random init; the harness runs it by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from helpers import REPO, TINY, fit, fresh_copy
from ssl_kit.bench.store import ResultStore
from ssl_kit.data.segmentation import NUM_SCENE_CLASSES, Digit, Scenes, digit_scene_splits, draw_digits, glyph_pools
from ssl_kit.evaluation.segmentation import (
    DenseSet, linear_segmentation, location_labels, mean_iou_metric, segmentation_probe, spatial_features,
)  # fmt: skip
from ssl_kit.inputs import InputSpec
from ssl_kit.models.backbones import backbone_spec, build_from_spec


@pytest.mark.usefixtures("one_thread")
def test_mean_iou_pools_pixels_over_the_set_and_leaves_out_absent_classes():
    # two 1x4 images; classes 0-2 occur, class 3 is in neither the prediction nor the target
    target = torch.tensor([[[0, 0, 1, 1]], [[0, 2, 2, 1]]])
    predicted = torch.tensor([[[0, 1, 1, 1]], [[0, 2, 0, 1]]])
    # pixels in both / in either, over the two images: class 0: 2 / 4, class 1: 3 / 4, class 2: 1 / 2
    expected = (2 / 4 + 3 / 4 + 1 / 2) / 3  # class 3 counted as 0 would give 0.4375, as 1 0.6875
    assert mean_iou_metric(4)(predicted, target).item() == pytest.approx(expected)
    # accumulated image by image, as the probe scores a split: still the pooled number, not the
    # mean of the per-image mIoUs (0.583 and 0.667: 0.625)
    metric = mean_iou_metric(4)
    for image in range(2):
        metric.update(predicted[image : image + 1], target[image : image + 1])
    assert metric.compute().item() == pytest.approx(expected)


@pytest.mark.usefixtures("one_thread")
def test_drawn_mask_is_where_the_ink_covers_at_least_half_a_pixel():
    glyph = torch.zeros(8, 8)
    glyph[2:6, 2:6] = 1.0  # a 4x4 block of ink
    background = torch.full((3, 24, 24), 0.2)
    colour = torch.tensor([0.9, 0.5, 0.1])
    image, mask = draw_digits(background, [Digit(glyph, 7, top=3, left=5, side=16, colour=tuple(colour.tolist()))])
    # Upscaled 2x bilinearly, the block's ink is 1 on its inner 6 rows and columns, then 0.75, then
    # 0.25 on the rings around them, 0 beyond: the mask (digit 7 -> class 8) is the 8x8 of ink >= 0.5.
    expected = torch.zeros(24, 24, dtype=torch.long)
    expected[7:15, 9:17] = 8
    assert torch.equal(mask, expected)
    assert torch.allclose(image[:, 8:14, 10:16], colour.view(3, 1, 1).expand(3, 6, 6))  # full ink: the digit's colour
    assert torch.allclose(image[:, 7, 12], 0.25 * 0.2 + 0.75 * colour)  # ink 0.75: in the mask
    assert torch.allclose(image[:, 6, 12], 0.75 * 0.2 + 0.25 * colour)  # ink 0.25: not in the mask
    untouched = torch.ones(24, 24, dtype=torch.bool)
    untouched[6:16, 8:18] = False
    assert torch.equal(image[:, untouched], background[:, untouched])
    with pytest.raises(ValueError, match="leaves the"):
        draw_digits(background, [Digit(glyph, 7, top=10, left=5, side=16, colour=(1.0, 1.0, 1.0))])


@pytest.mark.usefixtures("one_thread")
def test_scenes_are_a_deterministic_function_of_the_seed():
    first, again, other = (digit_scene_splits(16, train=8, val=4, test=4, seed=seed) for seed in (0, 0, 1))
    for split in ("train", "val", "test"):
        assert torch.equal(first[split].images, again[split].images) and torch.equal(first[split].masks, again[split].masks)
        assert not torch.equal(first[split].images, other[split].images)
    train = first["train"]
    assert train.images.shape == (8, 3, 16, 16) and train.images.dtype == torch.uint8 and train.masks.shape == (8, 16, 16)
    assert int(train.masks.max()) < NUM_SCENE_CLASSES and (train.masks > 0).flatten(1).any(1).all()  # a digit in every scene
    ink = train.masks > 0  # the digits are drawn brighter than the background on average
    assert train.images.float().mean(1)[ink].mean() > train.images.float().mean(1)[~ink].mean() + 40
    # val and test scenes draw their digits from handwriting the train scenes never show
    from sklearn.datasets import load_digits

    pools = {split: set(indices.tolist()) for split, indices in glyph_pools(load_digits().target).items()}
    assert not (pools["train"] & pools["val"] or pools["train"] & pools["test"] or pools["val"] & pools["test"])
    assert len(pools["train"] | pools["val"] | pools["test"]) == 1797


@pytest.mark.usefixtures("one_thread")
def test_masks_are_downsampled_to_the_centre_pixel_of_each_location():
    masks = torch.arange(32).view(2, 4, 4)
    assert location_labels(masks, (2, 2)).tolist() == [5, 7, 13, 15, 21, 23, 29, 31]


@pytest.mark.usefixtures("one_thread")
def test_spatial_features_are_vit_patch_tokens_on_their_grid_and_the_resnet_map_before_pooling():
    images = torch.randn(2, 3, 16, 8)
    vit = build_from_spec(
        backbone_spec("vit_tiny_patch16_224", InputSpec.image((16, 8)), extra_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    ).eval()
    with torch.no_grad():
        maps, tokens = spatial_features(vit, images), vit.forward_features(images)  # timm: class token, then patches row by row
    assert maps.shape == (2, 32, 4, 2)  # 4 px patches: 4 rows of 2
    assert torch.allclose(maps[:, :, 3, 1], tokens[:, 1 + 3 * 2 + 1]) and torch.allclose(maps[:, :, 1, 0], tokens[:, 1 + 1 * 2 + 0])
    resnet = build_from_spec(backbone_spec("resnet18_slim", InputSpec.image(16))).eval()
    square = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        maps = spatial_features(resnet, square)
        assert maps.shape == (2, 256, 2, 2) and torch.allclose(maps.mean((2, 3)), resnet(square), atol=1e-6)
    with pytest.raises(TypeError, match="segmentation probe needs"):
        spatial_features(nn.Linear(3, 2), images)


def oracle(scenes: Scenes, noise_seed: int) -> DenseSet:
    """Features that hold each pixel's class (one-hot plus noise), at the masks' own resolution."""
    one_hot = F.one_hot(scenes.masks, NUM_SCENE_CLASSES).permute(0, 3, 1, 2).float()
    return DenseSet(one_hot + 0.1 * torch.randn(one_hot.shape, generator=torch.Generator().manual_seed(noise_seed)), scenes.masks)


@pytest.mark.usefixtures("one_thread")
def test_probe_recovers_the_masks_from_oracle_features_and_chooses_on_val_only():
    scenes = digit_scene_splits(8, train=100, val=30, test=30)
    train, val, test = (oracle(scenes[split], seed) for seed, split in enumerate(("train", "val", "test")))
    settings = {"epochs": 10, "batch_size": 256, "lrs": (1e-4, 0.1, 1.0), "weight_decays": (0.0, 0.1)}
    result = segmentation_probe(train, val, test, NUM_SCENE_CLASSES, **settings)
    assert result.test_miou > 0.9, result
    assert len(result.val_grid) == 6 and result.val_miou == max(miou for _, _, miou in result.val_grid)
    shuffled = DenseSet(test.features, test.masks[torch.randperm(len(test.masks), generator=torch.Generator().manual_seed(0))])
    blind = segmentation_probe(train, val, shuffled, NUM_SCENE_CLASSES, **settings)
    assert (blind.chosen, blind.val_miou, blind.val_grid) == (result.chosen, result.val_miou, result.val_grid)
    assert blind.test_miou < 0.5  # the test masks did change; the choice did not


def background_only_miou(size: int, test_scenes: int) -> float:
    """The mIoU of predicting the background everywhere on the test scenes (0.07): the best
    constant prediction, the floor to beat (uniformly random classes score about 0.02)."""
    masks = digit_scene_splits(size, train=1, val=1, test=test_scenes)["test"].masks  # each split has its own random stream
    return mean_iou_metric(NUM_SCENE_CLASSES)(torch.zeros_like(masks), masks).item()


@pytest.mark.usefixtures("one_thread")
def test_probe_on_a_tiny_random_vit_beats_predicting_the_background():
    """A 1-block ViT at random init (4 px patches on 32 px scenes: an 8x8 grid) tells ink from
    background fairly well and the digits hardly at all: measured 0.117 against 0.071."""
    torch.manual_seed(0)
    spec = InputSpec.image(32, (0.4,) * 3, (0.25,) * 3)
    vit = build_from_spec(backbone_spec("vit_tiny_patch16_224", spec, extra_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}))
    result = linear_segmentation(vit, spec, train_scenes=200, val_scenes=50, test_scenes=100, epochs=10, lrs=(0.1, 1.0), weight_decays=(0.0,))
    floor = background_only_miou(32, 100)
    print(f"tiny random ViT: test mIoU {result.test_miou:.3f}, background only {floor:.3f}")
    assert result.test_miou > floor + 0.03


def test_protocol_refuses_input_it_cannot_draw():
    with pytest.raises(ValueError, match="square, normalised RGB images; this backbone takes audio input of 1 channel"):
        linear_segmentation(nn.Linear(2, 2), InputSpec("audio", (64, 101), 1))


#: ``helpers.TINY_RUN`` without its two-batch epochs.
SHORT_RUN = [
    "--data.num_workers", "2", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.accelerator", "cpu",
]  # fmt: skip


@pytest.mark.slow
def test_short_simclr_run_segments_better_than_random_init(tmp_path):
    """SimCLR on the embedded digits at 16 px (80 steps), probed on 32 px scenes (digits of a
    similar size; a 4x4 map out of ``resnet18_slim``'s last stage), against the same network at
    random init."""
    cli = fit(
        "simclr_digits.yaml", tmp_path, "--model.backbone", "resnet18_slim", "--trainer.max_epochs", "10",
        "--model.warmup_epochs", "1", "--trainer.check_val_every_n_epoch", "10", base=SHORT_RUN,
    )  # fmt: skip
    spec = cli.datamodule.input_spec
    trained = linear_segmentation(cli.model.backbone, spec, image_size=32).test_miou
    random_init = linear_segmentation(fresh_copy(cli.model).backbone, spec, image_size=32).test_miou
    print(f"segmentation mIoU after {cli.trainer.global_step} SimCLR steps: {trained:.3f} vs random init {random_init:.3f}")
    assert trained > random_init + 0.03


@pytest.mark.slow
def test_the_harness_runs_the_segmentation_protocol_by_name(tmp_path):
    from ssl_kit.bench.__main__ import main

    suite = {
        "name": "seg", "seeds": [0], "store": str(tmp_path / "store.sqlite"), "workdir": str(tmp_path / "runs"),
        "protocols": {"segmentation": {"train_scenes": 40, "val_scenes": 20, "test_scenes": 20, "epochs": 2, "lrs": [0.1], "weight_decays": [0.0]}},
        "entries": [{"method": "SimCLR", "dataset": "Digits", "config": str(REPO / "configs" / "simclr_digits.yaml"),
                     "args": [*TINY, "--trainer.max_epochs", "1", "--model.warmup_epochs", "0"]}],
    }  # fmt: skip
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    main(["--config", str(tmp_path / "suite.yaml")])
    (row,) = ResultStore(suite["store"]).rows("seg")
    assert (row["protocol"], row["metric"]) == ("segmentation", "miou") and 0.0 <= row["value"] <= 1.0
    assert row["config"]["protocol"]["lr"] == 0.1 and row["config"]["protocol"]["train_scenes"] == 40
