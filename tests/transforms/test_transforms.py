"""View augmentations: shapes, per-view settings, and the on-device stage being called in training."""

from __future__ import annotations

import torch
from PIL import Image

from helpers import fit
from ssl_kit.inputs import InputSpec
from ssl_kit.transforms import ImageViews


def make_views(**kwargs) -> ImageViews:
    views = ImageViews(**kwargs)
    views.configure(InputSpec.image(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    return views


def test_global_and_local_views_have_requested_count_and_sizes():
    views = make_views(num_views=2, local_views=4, local_size=12)
    out = views(Image.new("RGB", (40, 40), (128, 64, 32)))
    assert [tuple(v.shape) for v in out] == [(3, 32, 32)] * 2 + [(3, 12, 12)] * 4


def test_per_view_probabilities_build_asymmetric_pipelines():
    views = make_views(blur_prob=[1.0, 0.1], solarize_prob=[0.0, 0.2])
    names = [[type(t).__name__ for t in p.transforms] for p in views.pipelines]
    first, second = views.pipelines
    assert "RandomSolarize" not in names[0] and "RandomSolarize" in names[1]
    blur_probs = [t.p for p in (first, second) for t in p.transforms if "GaussianBlur" in repr(t)]
    assert blur_probs == [1.0, 0.1]


def test_views_are_normalised_with_dataset_statistics():
    views = make_views(crop_scale=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0)
    out = views(Image.new("RGB", (32, 32), (255, 0, 128)))[0]
    expected = (torch.tensor([255, 0, 128]) / 255 - 0.5) / 0.25
    assert torch.allclose(out[:, 5, 5], expected, atol=1e-2)


class ZeroingViews(ImageViews):
    """A stand-in for a batched on-device augmentation: records that it ran on transferred batches."""

    calls = 0

    def on_device(self, views):
        type(self).calls += 1
        assert all(v.dim() == 4 for v in views)
        return [torch.zeros_like(v) for v in views]


def test_on_device_stage_runs_once_per_training_batch(tmp_path):
    ZeroingViews.calls = 0
    fit("quickstart.yaml", tmp_path, "--trainer.max_epochs", "1", "--data.views", f"{__name__}.ZeroingViews")
    assert ZeroingViews.calls == 2  # two training batches; validation batches do not pass through it
