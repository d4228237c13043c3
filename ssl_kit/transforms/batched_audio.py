"""Batched, on-device audio views: ``AudioViews``' augmentations with per-sample random parameters,
computed once per batch on the training device, the log-mel front end included.

Stages: ``__call__`` (loader workers) returns one float waveform ``(clip_samples,)`` per view: the
random crop (or zero-pad) of each view stays in the worker, where files of any length become
fixed-length clips that batch, and it costs only a slice. ``on_device`` turns the ``num_views``
batches ``(B, clip_samples)`` into spectrogram views ``(B, 1, n_mels, frames)``: gain, white noise at
a random SNR, log-mel, mixing with a past spectrogram, resize-crop in time and frequency, SpecAugment
masks, each with its own parameters per sample, drawn from ``AudioViews``' distributions.

Differences from the per-sample pipeline, by design: the mixing memory (the last ``mixup_memory``
unmixed spectrograms, as ``AudioViews`` keeps them) is one per training process, filled in batch
order one view after the other, where per sample each loader worker keeps its own; and everything
runs in float32 on the device (the same maths: outputs equal the per-sample code's for the same
parameters up to float rounding). ``sample_params`` and ``apply`` expose the two halves for tests.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from ssl_kit.transforms.audio import AudioViews, LogMel, fit_length
from ssl_kit.transforms.kernels import resize_crop, span_mask

@dataclass
class AudioParams:
    """Per-sample random parameters of one view, batch first."""

    gain_db: Tensor  # (B,)
    noise: Tensor  # (B,) bool: white noise added
    snr_db: Tensor  # (B,)
    noise_samples: Tensor  # (B, clip_samples) standard normal
    mix: Tensor  # (B,) bool: mixed with a past spectrogram (false while the memory is empty)
    past: Tensor  # (B,) int64: that spectrogram's row in the memory followed by this batch's spectrograms
    ratio: Tensor  # (B,) mixing ratio
    crop: Tensor  # (B, 4) int64: top, left, height, width of the region (may reach into the zero padding)
    time_masks: Tensor  # (B, time_masks, 2) int64: start, length
    freq_masks: Tensor  # (B, freq_masks, 2) int64: start, length


class BatchedAudioViews(AudioViews):
    """``AudioViews`` computed per batch on the training device (see the module doc); a config
    switches with ``class_path: BatchedAudioViews``, alone or as a part of ``PairedViews``."""

    def build(self) -> None:
        super().build()
        self.shape = self.input_spec.shape
        self.past = torch.empty(0, 1, *self.shape)  # the mixing memory, moved to the device on first use
        self.frontends: dict[torch.device, LogMel] = {}

    def __call__(self, waveform: Tensor) -> list[Tensor]:
        return [fit_length(waveform, self.clip_samples, "random") for _ in range(self.num_views)]

    def on_device(self, views: list[Tensor]) -> list[Tensor]:
        out = []
        for waveforms in views:
            params = self.sample_params(len(waveforms), len(self.past), device=waveforms.device)
            view, self.past = self.apply(waveforms, params, self.past.to(waveforms.device))
            out.append(view)
        return out

    def frontend_on(self, device: torch.device) -> LogMel:
        """The front end on ``device``: a copy, as loader workers and evaluation keep the CPU one."""
        if device not in self.frontends:
            self.frontends[device] = copy.deepcopy(self.frontend).to(device)
        return self.frontends[device]

    def sample_params(
        self, batch_size: int, stored: int = 0, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> AudioParams:
        """Independent draws per sample with ``AudioViews``' distributions; ``stored`` spectrograms
        are in the mixing memory. Sample ``i`` may mix with any of the last ``mixup_memory`` of the
        memory and samples ``0..i-1``, as if they had been made one at a time."""

        def uniform(low: float, high: float, *shape: int) -> Tensor:
            return low + (high - low) * torch.rand(batch_size, *shape, generator=generator, device=device)

        def integers(high: Tensor | int, *shape: int) -> Tensor:
            """``random.randint(0, high)``: uniform on 0..high."""
            return (uniform(0, 1, *shape) * (torch.as_tensor(high, device=device) + 1)).floor().long()

        height, width = self.shape
        seen = stored + torch.arange(batch_size, device=device)  # made before sample i
        first = (seen - self.memory.maxlen).clamp_min(0)
        low, high = self.resize_crop_scale
        crop_h = (height * uniform(low, high)).round().clamp_min(1).long()
        crop_w = (width * uniform(low, high)).round().clamp_min(1).long()
        top = integers((height - crop_h).clamp_min(0))
        left = integers((width - crop_w).clamp_min(0))

        def spans(count: int, fraction: float, size: int) -> Tensor:
            length = integers(int(fraction * size), count)
            return torch.stack([integers(size - length, count), length], -1)

        return AudioParams(
            gain_db=uniform(-self.gain_db, self.gain_db),
            noise=uniform(0, 1) < self.noise_prob,
            snr_db=uniform(*self.noise_snr_db),
            noise_samples=torch.randn(batch_size, self.clip_samples, generator=generator, device=device),
            mix=(seen > first) & (self.mixup_alpha > 0),
            past=first + (uniform(0, 1) * (seen - first)).floor().long(),
            ratio=uniform(0, self.mixup_alpha),
            crop=torch.stack([top, left, crop_h, crop_w], 1),
            time_masks=spans(self.time_masks, self.time_mask, width),
            freq_masks=spans(self.freq_masks, self.freq_mask, height),
        )

    def apply(self, waveforms: Tensor, params: AudioParams, memory: Tensor) -> tuple[Tensor, Tensor]:
        """The views of waveforms ``(B, clip_samples)`` with the given parameters, and the mixing
        memory after them: ``(views (B, 1, n_mels, frames), memory)``."""
        clips = waveforms * 10 ** (params.gain_db[:, None] / 20)
        power = clips.pow(2).mean(1, keepdim=True).clamp_min(1e-10)
        noisy = clips + params.noise_samples * torch.sqrt(power / 10 ** (params.snr_db[:, None] / 10))
        clips = torch.where(params.noise[:, None], noisy, clips)
        spectrograms = self.frontend_on(clips.device)(clips)
        history = torch.cat([memory, spectrograms])
        ratio = params.ratio.view(-1, 1, 1, 1)
        mixed = torch.log((1 - ratio) * spectrograms.exp() + ratio * history[params.past].exp())
        out = torch.where(params.mix.view(-1, 1, 1, 1), mixed, spectrograms)
        out = resize_crop(out, params.crop)
        out = out.masked_fill(span_mask(params.time_masks, out.shape[-1])[:, None, None, :], 0.0)
        out = out.masked_fill(span_mask(params.freq_masks, out.shape[-2])[:, None, :, None], 0.0)
        return out, history[max(0, len(history) - self.memory.maxlen) :]
