"""Batched on-device video and audio views: the per-sample pipelines' parameter distributions, the
per-sample outputs for the same parameters, one set of parameters per clip, real loader batches
and the CLI."""

from __future__ import annotations

import random
from collections import deque
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from helpers import TINY_RUN, fit
from ssl_kit.inputs import InputSpec, LogMelSettings
from ssl_kit.transforms import AudioViews, BatchedAudioViews, BatchedVideoViews, PairedViews
from ssl_kit.transforms import audio as audio_module
from ssl_kit.transforms.batched import ViewParams, ViewSpec

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
DRAWS = 10_000
KS_MAX = 0.03  # about the 0.1% critical value of the two-sample KS statistic at 10,000 draws each
RATE_TOL = 0.02  # over 4 standard errors of a rate at 10,000 draws
ATOL = 1e-4  # float32 differences of the same maths computed differently, after normalising


pytestmark = pytest.mark.usefixtures("one_thread")


# -- video -----------------------------------------------------------------------------------
def video_views(frames: int = 4, size: int = 16, **kwargs) -> BatchedVideoViews:
    views = BatchedVideoViews(**kwargs)
    views.configure(InputSpec.video(frames, size, MEAN, STD))
    return views


def video_reference(clip: torch.Tensor, spec: ViewSpec, params: ViewParams, i: int) -> torch.Tensor:
    """Clip ``i``'s view by torchvision's v2 functional API on the whole ``(T, C, H, W)`` clip."""
    top, left, height, width = params.box[i].tolist()
    out = TF.resized_crop(clip, top, left, height, width, [spec.size] * 2, InterpolationMode.BILINEAR, antialias=False)
    if params.flip[i]:
        out = TF.hflip(out)
    if params.jitter[i]:
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in params.order[i].tolist():
            out = adjust[op](out, params.factors[i, op].item())
    if params.grayscale[i]:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    out = TF.normalize(out, list(MEAN), list(STD))
    if params.erase[i]:
        out = TF.erase(out, *params.erase_box[i].tolist(), v=torch.tensor(spec.erase_value))
    return out.transpose(0, 1)  # (C, T, H, W), as VideoViews gives


def test_video_spec_follows_the_per_sample_pipeline():
    views = video_views(crop_scale=(0.5, 1.0), flip_prob=0.0, erase_prob=0.3, erase_scale=(0.05, 0.2), hue=0.0)
    spec = views.spec
    assert (spec.size, spec.scale, spec.flip_prob, spec.jitter_prob, spec.grayscale_prob) == (16, (0.5, 1.0), 0.0, 0.8, 0.2)
    assert spec.jitter == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), None)
    assert (spec.erase_prob, spec.erase_scale, spec.erase_ratio, spec.erase_value) == (0.3, (0.05, 0.2), (0.3, 3.3), 0.0)
    assert views.side == 16 and video_views(decode_size=24).side == 24


def test_video_crop_and_erase_boxes_follow_torchvision_v2():
    views = video_views(size=32, crop_scale=(0.3, 1.0), erase_prob=1.0, erase_scale=(0.02, 0.25))
    ours = views.sample_params(DRAWS, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    clip = torch.empty(2, 3, 32, 32)
    crop = v2.RandomResizedCrop(32, scale=(0.3, 1.0))
    erasing = v2.RandomErasing(1.0, scale=(0.02, 0.25), value=0)
    crops = [crop.make_params([clip]) for _ in range(DRAWS)]
    erases = [erasing.make_params([clip]) for _ in range(DRAWS)]
    theirs_crop = torch.tensor([[p["top"], p["left"], p["height"], p["width"]] for p in crops]).double()
    theirs_erase = torch.tensor([[p["i"], p["j"], p["h"], p["w"]] for p in erases if p["v"] is not None]).double()
    assert abs(ours.erase.float().mean().item() - len(theirs_erase) / DRAWS) < RATE_TOL

    def statistics(box):
        top, left, height, width = box.unbind(1)
        return {"area": height * width, "log ratio": (width / height).log(), "x": left + width / 2, "y": top + height / 2}

    for name, mine, reference in [("crop", ours.box, theirs_crop), ("erase", ours.erase_box[ours.erase], theirs_erase)]:
        for (key, a), b in zip(statistics(mine.double()).items(), statistics(reference).values()):
            assert ks_2samp(a.numpy(), b.numpy()).statistic < KS_MAX, f"{name} {key}"
    assert (ours.box[:, :2] >= 0).all() and (ours.box[:, :2] + ours.box[:, 2:] <= 32).all()
    assert (ours.erase_box[ours.erase, 2:] < 32).all()


def test_video_rates_match_the_per_sample_settings():
    params = video_views(flip_prob=0.3, erase_prob=0.4).sample_params(DRAWS, torch.Generator().manual_seed(1))
    for mask, rate in [(params.flip, 0.3), (params.jitter, 0.8), (params.grayscale, 0.2), (params.erase, 0.4)]:
        assert abs(mask.float().mean().item() - rate) < RATE_TOL
    first = torch.bincount(params.order[:, 0], minlength=4).float() / DRAWS
    assert (first - 0.25).abs().max() < RATE_TOL


def test_video_views_match_torchvision_v2_for_the_same_parameters():
    views = video_views(frames=3, size=12, jitter_prob=0.5, erase_prob=0.5, decode_size=20)
    clips = (torch.rand(16, 3, 3, 20, 20, generator=torch.Generator().manual_seed(2)) * 255).round() / 255
    params = views.sample_params(16, torch.Generator().manual_seed(3))
    out = views.apply(clips, params)
    assert out.shape == (16, 3, 3, 12, 12)
    for i, clip in enumerate(clips):
        torch.testing.assert_close(out[i], video_reference(clip, views.spec, params, i), atol=ATOL, rtol=0)
    for mask in (params.flip, params.jitter, params.grayscale, params.erase):
        assert 0 < mask.sum() < 16


def test_every_frame_of_a_clip_gets_the_same_parameters():
    views = video_views(frames=5, size=16, erase_prob=0.5)
    still = torch.rand(12, 1, 3, 16, 16, generator=torch.Generator().manual_seed(4)).expand(-1, 5, -1, -1, -1)
    torch.manual_seed(5)
    for view in views.on_device([(still * 255).round().to(torch.uint8)]):
        assert view.shape == (12, 3, 5, 16, 16)
        torch.testing.assert_close(view, view[:, :, :1].expand_as(view), atol=0, rtol=0)  # frames stay equal
        assert not torch.allclose(view[0], view[1])


def test_video_loader_batch_and_paired_views():
    from ssl_kit.data import MovingDigitsDataModule

    views = PairedViews(BatchedVideoViews(num_views=1, flip_prob=0.0), BatchedVideoViews(num_views=1, erase_prob=1.0))
    datamodule = MovingDigitsDataModule(
        frames_per_clip=4, frame_size=16, clips_per_class=4, views=views, batch_size=6, num_workers=0
    )
    datamodule.setup()
    decoded, labels = next(iter(datamodule.train_dataloader()))
    assert [(d.dtype, tuple(d.shape)) for d in decoded] == [(torch.uint8, (6, 4, 3, 16, 16))] * 2
    datamodule.trainer = SimpleNamespace(training=True)  # on_after_batch_transfer augments training batches only
    out, _ = datamodule.on_after_batch_transfer((decoded, labels), 0)
    assert [tuple(v.shape) for v in out] == [(6, 3, 4, 16, 16)] * 2 and all(v.dtype == torch.float32 for v in out)
    assert (out[1] == 0).any() and not torch.allclose(out[0], out[1])


def test_video_decode_resizes_and_centre_crops_to_one_size():
    views = video_views(frames=2, size=16, decode_size=24)
    clip = torch.randint(0, 256, (2, 3, 30, 48), dtype=torch.uint8)
    (decoded,) = views(clip)
    assert decoded.dtype == torch.uint8 and decoded.shape == (2, 3, 24, 24)


# -- audio -----------------------------------------------------------------------------------
RATE, CLIP = 8000, 800


def audio_views(cls=BatchedAudioViews, **kwargs) -> AudioViews:
    views = cls(**kwargs)
    views.configure(InputSpec.audio(LogMelSettings(RATE, CLIP, n_fft=128, n_mels=16)))
    return views


class Recording:
    """Stands in for ``random`` in ``ssl_kit.transforms.audio``: draws from a seeded generator and
    records ``(name, result)``, so the per-sample code's own draws can be compared with ours."""

    def __init__(self, seed: int) -> None:
        self.generator, self.calls = random.Random(seed), []

    def __getattr__(self, name):
        def draw(*args):
            result = getattr(self.generator, name)(*args)
            self.calls.append((name, result))
            return result

        return draw


class Script:
    """Stands in for ``random`` in ``ssl_kit.transforms.audio``: returns the given values in order,
    so the per-sample code runs with the batched sampler's parameters."""

    def __init__(self) -> None:
        self.values: deque = deque()

    def __getattr__(self, name):
        def replay(*args):
            expected, value = self.values.popleft()
            assert expected == name, f"per-sample code drew {name}, the script has {expected}"
            return value(*args) if callable(value) else value

        return replay


def per_sample_draws(monkeypatch, method, calls_per_draw: int) -> torch.Tensor:
    """``DRAWS`` calls of ``method`` under a ``Recording``: its draws, ``(DRAWS, calls_per_draw)``."""
    recording = Recording(0)
    monkeypatch.setattr(audio_module, "random", recording)
    for _ in range(DRAWS):
        method()
    monkeypatch.undo()
    return torch.tensor([result for _, result in recording.calls], dtype=torch.float64).view(DRAWS, calls_per_draw)


def test_audio_parameters_follow_the_per_sample_draws(monkeypatch):
    views = audio_views(resize_crop_scale=(0.6, 1.5), time_masks=1, freq_masks=1, time_mask=0.3, freq_mask=0.25)
    height, width = views.shape
    ours = views.sample_params(DRAWS, generator=torch.Generator().manual_seed(0))
    spectrogram = torch.zeros(1, height, width)

    scale_h, scale_w, top, left = per_sample_draws(monkeypatch, lambda: views.resize_crop(spectrogram), 4).unbind(1)
    crop_h, crop_w = (height * scale_h).round().clamp_min(1), (width * scale_w).round().clamp_min(1)
    masks = per_sample_draws(monkeypatch, lambda: views.spec_augment(spectrogram), 4)  # time length, start, freq length, start
    reference = {
        "crop": torch.stack([top, left, crop_h, crop_w], 1),
        "time": masks[:, [1, 0]],
        "freq": masks[:, [3, 2]],
    }
    mine = {"crop": ours.crop, "time": ours.time_masks[:, 0], "freq": ours.freq_masks[:, 0]}
    for name in reference:
        for column, (a, b) in enumerate(zip(mine[name].double().T, reference[name].T)):
            assert ks_2samp(a.numpy(), b.numpy()).statistic < KS_MAX, f"{name} column {column}"

    # single uniform draws per sample (random.uniform): their range and mean
    for values, (low, high) in [(ours.gain_db, (-6.0, 6.0)), (ours.snr_db, (10.0, 40.0)), (ours.ratio, (0.0, 0.4))]:
        assert low <= values.min() < low + 0.01 * (high - low) and high - 0.01 * (high - low) < values.max() <= high
        assert abs(values.mean().item() - (low + high) / 2) < 0.01 * (high - low)
    assert abs(ours.noise.float().mean().item() - 0.5) < RATE_TOL
    assert abs(ours.noise_samples.std().item() - 1) < 0.01


def test_audio_mixing_memory_is_the_per_sample_fifo():
    views = audio_views(mixup_memory=4)
    params = views.sample_params(6, stored=3, generator=torch.Generator().manual_seed(0))
    assert params.mix.all()
    # sample i sees the last 4 of the 3 stored and the samples before it: rows max(0, i - 1) .. i + 2
    for i, past in enumerate(params.past.tolist()):
        assert max(0, 3 + i - 4) <= past < 3 + i
    draws = views.sample_params(DRAWS, stored=4, generator=torch.Generator().manual_seed(1))
    ages = (4 + torch.arange(DRAWS) - draws.past)[4:]  # 1..4, uniformly
    assert ages.min() == 1 and ages.max() == 4
    assert ((torch.bincount(ages)[1:].float() / len(ages)) - 0.25).abs().max() < RATE_TOL
    assert not views.sample_params(2, generator=torch.Generator()).mix[0]  # an empty memory: nothing to mix
    assert not audio_views(mixup_alpha=0.0).sample_params(4, stored=3).mix.any()


def test_audio_views_match_the_per_sample_code_for_the_same_parameters(monkeypatch):
    views = audio_views(mixup_memory=3, noise_prob=0.5)
    reference = audio_views(AudioViews, num_views=1, mixup_memory=3, noise_prob=0.5)
    batch, stored = 8, 2
    waveforms = torch.randn(batch, CLIP, generator=torch.Generator().manual_seed(1)) * 0.1
    memory = torch.randn(stored, 1, *views.shape, generator=torch.Generator().manual_seed(2))
    p = views.sample_params(batch, stored, generator=torch.Generator().manual_seed(3))
    out, new_memory = views.apply(waveforms, p, memory)

    script = Script()
    monkeypatch.setattr(audio_module, "random", script)
    history = list(memory)
    height, width = views.shape
    for i in range(batch):
        script.values.extend([("randint", 0), ("uniform", p.gain_db[i].item()), ("random", 0.0 if p.noise[i] else 1.0)])
        if p.noise[i]:
            script.values.append(("uniform", p.snr_db[i].item()))
            monkeypatch.setattr(torch, "randn_like", lambda clip, i=i: p.noise_samples[i].clone())
        reference.memory = deque([history[p.past[i]]] if p.mix[i] else [], maxlen=3)
        if p.mix[i]:
            script.values.extend([("choice", lambda seq: seq[0]), ("uniform", p.ratio[i].item())])
        top, left, crop_h, crop_w = p.crop[i].tolist()
        script.values.extend([("uniform", crop_h / height), ("uniform", crop_w / width), ("randint", top), ("randint", left)])
        for start, length in p.time_masks[i].tolist() + p.freq_masks[i].tolist():
            script.values.extend([("randint", length), ("randint", start)])
        (expected,) = reference(waveforms[i])
        assert not script.values
        history.append(reference.memory[-1])  # sample i's unmixed spectrogram
        torch.testing.assert_close(out[i], expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(new_memory, torch.stack(history[-3:]), atol=ATOL, rtol=0)
    assert 0 < p.noise.sum() < batch and p.mix.all() and (p.crop[:, 2:] != torch.tensor(views.shape)).any()


def test_audio_loader_batch_and_paired_views():
    from ssl_kit.data import SyntheticAudioDataModule

    paired = PairedViews(BatchedAudioViews(num_views=1), BatchedAudioViews(num_views=1, noise_prob=1.0))
    for views in (BatchedAudioViews(), paired):
        datamodule = SyntheticAudioDataModule(samples_per_class=4, n_fft=256, views=views, batch_size=6, num_workers=0)
        datamodule.setup()
        waveforms, labels = next(iter(datamodule.train_dataloader()))
        assert [(w.dtype, tuple(w.shape)) for w in waveforms] == [(torch.float32, (6, 8000))] * 2
        datamodule.trainer = SimpleNamespace(training=True)
        out, _ = datamodule.on_after_batch_transfer((waveforms, labels), 0)
        assert [tuple(v.shape) for v in out] == [(6, 1, 64, 101)] * 2 and not torch.allclose(out[0], out[1])
        assert all(len(part.past) == 6 * part.num_views for part in views.parts)  # the mixing memory


# -- the CLI ---------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["simclr_moving_digits_batched.yaml", "simclr_synthetic_audio_batched.yaml"])
@pytest.mark.slow
def test_batched_config_trains_two_steps(tmp_path, config):
    cli = fit(config, tmp_path, "--trainer.max_steps", "2", "--data.batch_size", "8", base=TINY_RUN)
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert type(cli.datamodule.views).__name__ in ("BatchedVideoViews", "BatchedAudioViews")
