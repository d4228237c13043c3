"""Audio front end and views: fixed-length clips, log-mel spectrograms, waveform and spectrogram
augmentations (no sox). A spectrogram is a 1-channel image ``(1, n_mels, frames)``, so image
backbones and every method take it unchanged."""

from __future__ import annotations

import random
from collections import deque
from typing import Literal

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from ssl_kit.inputs import LogMelSettings
from ssl_kit.transforms.base import ViewAugmentation


class LogMel(nn.Module):
    """``log(mel power spectrogram + eps)`` of a mono waveform, standardised per clip (zero mean,
    unit variance over the whole spectrogram), so no dataset statistics are needed."""

    def __init__(self, settings: LogMelSettings) -> None:
        super().__init__()
        self.settings = settings
        self.mel = torchaudio.transforms.MelSpectrogram(
            settings.sample_rate, n_fft=settings.n_fft, hop_length=settings.hop_length, n_mels=settings.n_mels,
            f_min=settings.f_min, f_max=settings.f_max, power=2.0,
        )  # fmt: skip

    def forward(self, waveform: Tensor) -> Tensor:
        spectrogram = torch.log(self.mel(waveform) + 1e-6).unsqueeze(-3)  # (..., 1, n_mels, frames)
        mean = spectrogram.mean(dim=(-1, -2, -3), keepdim=True)
        std = spectrogram.std(dim=(-1, -2, -3), keepdim=True)
        return (spectrogram - mean) / (std + 1e-5)


def fit_length(waveform: Tensor, samples: int, offset: Literal["random", "center"] = "center") -> Tensor:
    """Crops a longer clip, or zero-pads a shorter one, to exactly ``samples``; the clip is placed
    at a random or the central offset (the documented rule for short clips: pad, never reject)."""
    excess = waveform.shape[-1] - samples
    start = random.randint(0, abs(excess)) if offset == "random" else abs(excess) // 2
    if excess >= 0:
        return waveform[..., start : start + samples]
    return F.pad(waveform, (start, -excess - start))


class AudioEval:
    """Evaluation transform: the central ``clip_samples`` (zero-padded when shorter), log-mel."""

    def __init__(self, settings: LogMelSettings) -> None:
        self.frontend = LogMel(settings)
        self.clip_samples = settings.clip_samples

    def __call__(self, waveform: Tensor) -> Tensor:
        with torch.no_grad():
            return self.frontend(fit_length(waveform, self.clip_samples, "center"))


class AudioViews(ViewAugmentation):
    """Views of one clip for self-supervised audio (BYOL-A / SpecAugment style), per sample.

    Waveform: random crop (or pad) to the clip length, random gain of up to ``gain_db`` dB,
    additive white noise at an SNR drawn from ``noise_snr_db`` with probability ``noise_prob``.
    Log-mel: mixing with a recent clip in the linear-power domain (``mixup_alpha``: the mixing
    ratio is drawn from U(0, alpha); BYOL-A's mixup with past samples), random resize-crop in
    time and frequency (``resize_crop_scale``, as BYOL-A's 0.6-1.5 virtual crop), and
    ``time_masks`` / ``freq_masks`` SpecAugment masks of up to ``time_mask`` / ``freq_mask`` of
    the axis.
    """

    def __init__(
        self,
        num_views: int = 2,
        gain_db: float = 6.0,
        noise_prob: float = 0.5,
        noise_snr_db: tuple[float, float] = (10.0, 40.0),
        mixup_alpha: float = 0.4,
        resize_crop_scale: tuple[float, float] = (0.6, 1.5),
        time_masks: int = 2,
        time_mask: float = 0.1,
        freq_masks: int = 2,
        freq_mask: float = 0.1,
        mixup_memory: int = 64,
    ) -> None:
        self.num_views = num_views
        self.gain_db = gain_db
        self.noise_prob = noise_prob
        self.noise_snr_db = tuple(noise_snr_db)
        self.mixup_alpha = mixup_alpha
        self.resize_crop_scale = tuple(resize_crop_scale)
        self.time_masks, self.time_mask = time_masks, time_mask
        self.freq_masks, self.freq_mask = freq_masks, freq_mask
        self.memory: deque[Tensor] = deque(maxlen=mixup_memory)

    def build(self) -> None:
        """The input's front end (``LogMelSettings``) and clip length."""
        settings = self.input_spec.front_end
        if settings is None:
            raise ValueError(f"{type(self).__name__} needs an audio input with a log-mel front end, got a {self.input_spec.modality} input")
        self.frontend = LogMel(settings)
        self.clip_samples = settings.clip_samples

    # -- waveform ----------------------------------------------------------------------------
    def waveform_view(self, waveform: Tensor) -> Tensor:
        clip = fit_length(waveform, self.clip_samples, "random")
        clip = clip * 10 ** (random.uniform(-self.gain_db, self.gain_db) / 20)
        if random.random() < self.noise_prob:
            power = clip.pow(2).mean().clamp_min(1e-10)
            snr = random.uniform(*self.noise_snr_db)
            clip = clip + torch.randn_like(clip) * torch.sqrt(power / 10 ** (snr / 10))
        return clip

    # -- spectrogram -------------------------------------------------------------------------
    def mix_with_past(self, spectrogram: Tensor) -> Tensor:
        past = random.choice(self.memory) if self.memory else None
        self.memory.append(spectrogram)
        if past is None or self.mixup_alpha <= 0:
            return spectrogram
        ratio = random.uniform(0, self.mixup_alpha)
        return torch.log((1 - ratio) * spectrogram.exp() + ratio * past.exp())

    def resize_crop(self, spectrogram: Tensor) -> Tensor:
        """Crops a random region of ``scale`` times each axis (zero-padding when > 1) and resizes it back."""
        _, height, width = spectrogram.shape
        low, high = self.resize_crop_scale
        crop_h = max(1, round(height * random.uniform(low, high)))
        crop_w = max(1, round(width * random.uniform(low, high)))
        canvas = F.pad(spectrogram, (0, max(0, crop_w - width), 0, max(0, crop_h - height)))
        top = random.randint(0, canvas.shape[1] - crop_h)
        left = random.randint(0, canvas.shape[2] - crop_w)
        region = canvas[:, top : top + crop_h, left : left + crop_w]
        return F.interpolate(region.unsqueeze(0), size=(height, width), mode="bicubic", align_corners=False).squeeze(0)

    def spec_augment(self, spectrogram: Tensor) -> Tensor:
        spectrogram = spectrogram.clone()
        _, height, width = spectrogram.shape
        for count, fraction, axis, size in ((self.time_masks, self.time_mask, 2, width), (self.freq_masks, self.freq_mask, 1, height)):
            for _ in range(count):
                length = random.randint(0, max(0, int(fraction * size)))
                start = random.randint(0, size - length)
                spectrogram.narrow(axis, start, length).fill_(0.0)  # 0 is the clip mean after standardising
        return spectrogram

    def __call__(self, waveform: Tensor) -> list[Tensor]:
        views = []
        with torch.no_grad():
            for _ in range(self.num_views):
                spectrogram = self.frontend(self.waveform_view(waveform))
                spectrogram = self.mix_with_past(spectrogram)
                views.append(self.spec_augment(self.resize_crop(spectrogram)))
        return views

