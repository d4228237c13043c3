"""Batched on-device views: same parameter distributions as the per-sample pipeline, the same
outputs as torchvision's functional API for the same parameters, and a real loader batch."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from ssl_kit.inputs import InputSpec
from ssl_kit.transforms import BatchedImageViews, ViewAugmentation
from ssl_kit.transforms.batched import ViewParams, ViewSpec
from ssl_kit.transforms.kernels import ADJUST, color_jitter, gaussian_blur, grayscale, resized_crop, solarize
from ssl_kit.transforms.image import blur_kernel_size

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
DRAWS = 20_000
RATE_TOL = 0.015  # over 4 standard errors of a rate at 20,000 draws
#: Float32 differences of the same maths computed differently, after dividing by std >= 0.2.
#: Solarisation is discontinuous at its threshold, so a pixel within ~1e-6 of it could differ by
#: much more; the seeded inputs below have none.
ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def make_views(image_size: int = 16, **kwargs) -> BatchedImageViews:
    views = BatchedImageViews(**kwargs)
    views.configure(InputSpec.image(image_size, MEAN, STD))
    return views


def reference(image: torch.Tensor, spec: ViewSpec, params: ViewParams, i: int, mean=MEAN, std=STD) -> torch.Tensor:
    """Sample ``i``'s view with torchvision's functional API, the per-sample ground truth."""
    top, left, height, width = params.box[i].tolist()
    out = TF.resized_crop(image, top, left, height, width, [spec.size] * 2, T.InterpolationMode.BILINEAR, antialias=False)
    if params.flip[i]:
        out = TF.hflip(out)
    if params.jitter[i]:
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in params.order[i].tolist():
            if spec.jitter[op] is not None:
                out = adjust[op](out, params.factors[i, op].item())
    if params.grayscale[i]:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    if spec.blur_prob > 0 and params.blur[i]:
        out = TF.gaussian_blur(out, [spec.blur_kernel] * 2, [params.sigma[i].item()] * 2)
    if spec.solarize_prob > 0 and params.solarize[i]:
        out = TF.solarize(out, spec.solarize_threshold)
    return TF.normalize(out, list(mean), list(std))


def random_images(count: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


# -- configuration ---------------------------------------------------------------------------
def test_specs_follow_the_per_sample_pipelines():
    views = make_views(blur_prob=[1.0, 0.1], solarize_prob=[0.0, 0.2], local_views=2)
    assert [s.size for s in views.specs] == [16, 16, 8, 8]
    assert [s.blur_prob for s in views.specs] == [1.0, 0.1, 0.1, 0.1]
    assert [s.solarize_prob for s in views.specs] == [0.0, 0.2, 0.0, 0.0]
    assert [s.blur_kernel for s in views.specs] == [blur_kernel_size(16)] * 2 + [blur_kernel_size(8)] * 2
    assert [s.scale for s in views.specs] == [(0.08, 1.0)] * 2 + [(0.05, 0.4)] * 2
    assert views.specs[0].jitter == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
    assert make_views(brightness=0.0, hue=0.0).specs[0].jitter[::3] == (None, None)


def test_config_switches_with_the_class_name():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--views", type=ViewAugmentation)
    config = parser.parse_args(
        ["--views", '{"class_path": "BatchedImageViews", "init_args": {"blur_prob": [1.0, 0.1], "decode_size": 24}}']
    )
    views = parser.instantiate(config).views
    assert type(views) is BatchedImageViews and views.blur_prob == [1.0, 0.1] and views.decode_size == 24


# -- parameter statistics --------------------------------------------------------------------
@pytest.mark.parametrize("crop_scale", [(0.08, 1.0), (0.9, 1.0)])  # the second often falls back
@pytest.mark.slow
def test_crop_boxes_follow_torchvision_get_params(crop_scale):
    views = make_views(32, crop_scale=crop_scale)
    batched = views.sample_params(0, DRAWS, torch.Generator().manual_seed(0)).box.double()
    torch.manual_seed(0)
    image = torch.empty(3, 32, 32)
    per_sample = torch.tensor(
        [T.RandomResizedCrop.get_params(image, list(crop_scale), [3 / 4, 4 / 3]) for _ in range(DRAWS)]
    ).double()

    def statistics(box):
        top, left, height, width = box.unbind(1)
        area, log_ratio = height * width / 32**2, (width / height).log()
        return {"area": area, "log ratio": log_ratio, "x": left + width / 2, "y": top + height / 2}

    for (name, ours), theirs in zip(statistics(batched).items(), statistics(per_sample).values()):
        assert ks_2samp(ours.numpy(), theirs.numpy()).statistic < 0.02, name
    assert (batched[:, :2] >= 0).all() and (batched[:, :2] + batched[:, 2:] <= 32).all()


def test_rates_and_ranges_match_the_per_sample_settings():
    views = make_views(blur_prob=[1.0, 0.1], solarize_prob=[0.0, 0.2])
    for view, (blur, solar) in enumerate([(1.0, 0.0), (0.1, 0.2)]):
        p = views.sample_params(view, DRAWS, torch.Generator().manual_seed(view))
        for mask, rate in [(p.flip, 0.5), (p.jitter, 0.8), (p.grayscale, 0.2), (p.blur, blur), (p.solarize, solar)]:
            assert abs(mask.float().mean().item() - rate) < RATE_TOL
        jittered = p.factors[p.jitter]
        for op, (low, high) in enumerate(views.specs[view].jitter):
            values = jittered[:, op]
            assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() <= high
            assert abs(values.mean().item() - (low + high) / 2) < 0.01 * (high - low)
        assert (p.factors[~p.jitter] == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()
        assert (p.order.sort(1).values == torch.arange(4)).all()
        first = torch.bincount(p.order[:, 0], minlength=4).float() / DRAWS
        assert (first - 0.25).abs().max() < RATE_TOL
        assert 0.1 <= p.sigma.min() < 0.11 and 1.99 < p.sigma.max() <= 2.0


# -- identical outputs for identical parameters ------------------------------------------------
def test_resized_crop_and_flip_match_torchvision():
    images = random_images(6, 20)
    box = torch.tensor([[0, 0, 20, 20], [3, 5, 6, 9], [0, 11, 20, 9], [7, 0, 13, 4], [1, 1, 17, 15], [19, 19, 1, 1]])
    flip = torch.tensor([False, True, False, True, True, False])
    out = resized_crop(images, box, flip, 12)
    for i, image in enumerate(images):
        expected = TF.resized_crop(image, *box[i].tolist(), [12, 12], T.InterpolationMode.BILINEAR, antialias=False)
        expected = TF.hflip(expected) if flip[i] else expected
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "op, low, high",
    [(0, 0.6, 1.4), (1, 0.6, 1.4), (2, 0.0, 2.0), (3, -0.5, 0.5)],
    ids=["brightness", "contrast", "saturation", "hue"],
)
def test_each_jitter_op_matches_torchvision(op, low, high):
    images = random_images(8, 10)
    images[0] = 0.7  # gray: no hue
    images[1, 0] = images[1, 1]  # two channels tie for the maximum
    factors = torch.linspace(low, high, 8)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op]
    expected = torch.stack([adjust(image, f.item()) for image, f in zip(images, factors)])
    torch.testing.assert_close(ADJUST[op](images, factors), expected, atol=1e-5, rtol=0)


def test_color_jitter_applies_each_samples_order():
    views = make_views(jitter_prob=0.5, hue=0.3)
    params = views.sample_params(0, 16, torch.Generator().manual_seed(1))
    images = random_images(16, 10)
    out = color_jitter(images, params.factors, params.order, params.jitter, [True] * 4)
    for i, image in enumerate(images):
        expected = image
        if params.jitter[i]:
            adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
            for op in params.order[i].tolist():
                expected = adjust[op](expected, params.factors[i, op].item())
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    assert len({tuple(o) for o in params.order.tolist()}) > 1 and 0 < params.jitter.sum() < 16


def test_grayscale_blur_and_solarize_match_torchvision():
    images = random_images(6, 12)
    mask = torch.tensor([True, False, True, True, False, True])
    sigma = torch.tensor([0.1, 0.5, 0.9, 1.3, 1.7, 2.0])
    cases = [
        (grayscale(images, mask), lambda x, i: TF.rgb_to_grayscale(x, num_output_channels=3)),
        (gaussian_blur(images, sigma, mask, 5), lambda x, i: TF.gaussian_blur(x, [5, 5], [sigma[i].item()] * 2)),
        (solarize(images, mask, 128 / 255), lambda x, i: TF.solarize(x, 128 / 255)),
    ]
    for out, per_sample in cases:
        for i, image in enumerate(images):
            torch.testing.assert_close(out[i], per_sample(image, i) if mask[i] else image, atol=1e-5, rtol=0)


def test_whole_views_match_torchvision_for_the_same_parameters():
    views = make_views(blur_prob=[1.0, 0.5], solarize_prob=[0.0, 0.5], local_views=2, decode_size=24)
    images = (random_images(8, 24, seed=3) * 255).round() / 255  # decoded uint8 images, as float
    exercised = torch.zeros(5)
    for view, spec in enumerate(views.specs):
        params = views.sample_params(view, 8, torch.Generator().manual_seed(view))
        out = views.apply(images, view, params)
        expected = torch.stack([reference(image, spec, params, i) for i, image in enumerate(images)])
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
        masks = (params.flip, params.jitter, params.grayscale, params.blur, params.solarize & (spec.solarize_prob > 0))
        exercised += torch.stack([m.sum() for m in masks])
    assert (exercised > 0).all()


# -- a real loader batch ---------------------------------------------------------------------
def test_loader_batch_becomes_normalised_views_on_device():
    from ssl_kit.data import DigitsDataModule

    datamodule = DigitsDataModule(image_size=16, views=BatchedImageViews(local_views=2), batch_size=8, num_workers=0)
    datamodule.setup()
    decoded, labels = next(iter(datamodule.train_dataloader()))
    assert len(decoded) == 1 and decoded[0].dtype == torch.uint8 and decoded[0].shape == (8, 3, 16, 16)

    datamodule.trainer = SimpleNamespace(training=True)  # on_after_batch_transfer augments training batches only
    torch.manual_seed(0)
    views, same_labels = datamodule.on_after_batch_transfer((decoded, labels), 0)
    assert same_labels is labels
    assert [tuple(v.shape) for v in views] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2
    assert all(v.dtype == torch.float32 for v in views)
    low = (0 - np.array(datamodule.mean)) / np.array(datamodule.std)
    high = (1 - np.array(datamodule.mean)) / np.array(datamodule.std)
    for view in views:
        assert view.min() >= low.min() - 1e-5 and view.max() <= high.max() + 1e-5
    assert not torch.allclose(views[0], views[1])
    assert views[0].std() > 0.1
