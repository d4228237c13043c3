"""The description of one model input: what the DataModule serves, so that the views, the evaluation
transforms and the backbone factory read one typed value instead of decoding a size by its shape."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Modality = Literal["image", "audio", "video"]


@dataclass(frozen=True)
class LogMelSettings:
    """The audio front end: fixed-length clips of ``clip_samples`` at ``sample_rate`` become
    ``n_mels x frames`` log-mel spectrograms (hop ``hop_length`` samples, default 10 ms; band
    ``f_min``-``f_max`` Hz, default up to the Nyquist frequency)."""

    sample_rate: int
    clip_samples: int
    n_fft: int = 1024
    hop_length: int | None = None
    n_mels: int = 64
    f_min: float = 60.0
    f_max: float | None = None

    def __post_init__(self) -> None:
        if self.hop_length is None:
            object.__setattr__(self, "hop_length", self.sample_rate // 100)
        if self.f_max is None:
            object.__setattr__(self, "f_max", self.sample_rate / 2)

    @property
    def frames(self) -> int:
        """Spectrogram frames of one clip (centred STFT frames)."""
        return self.clip_samples // self.hop_length + 1


@dataclass(frozen=True)
class InputSpec:
    """What a model sees: ``modality``, ``channels`` and the per-sample ``shape`` without channels
    (image ``(height, width)``, audio ``(n_mels, frames)``, video ``(frames, height, width)``), the
    pixel normalisation (``mean`` / ``std``; None for spectrograms, which the front end standardises)
    and, for audio, the front end that makes the spectrogram. Built by the DataModule, linked into the
    model by the CLI and kept in checkpoints as a plain dict (``to_dict``)."""

    modality: Modality = "image"
    shape: tuple[int, ...] = (224, 224)
    channels: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    front_end: LogMelSettings | None = None

    def __post_init__(self) -> None:
        dims = 3 if self.modality == "video" else 2
        if len(self.shape) != dims:
            raise ValueError(f"a {self.modality} input has a shape of {dims} sizes, got {tuple(self.shape)}")
        if self.modality == "audio" and self.front_end is not None and self.shape != (self.front_end.n_mels, self.front_end.frames):
            raise ValueError(f"audio shape {tuple(self.shape)} does not match its front end's (n_mels, frames)")

    @classmethod
    def image(cls, size: int | tuple[int, int], mean=None, std=None, channels: int = 3) -> InputSpec:
        """Images of side ``size`` (or ``(height, width)``)."""
        shape = (size, size) if isinstance(size, int) else tuple(size)
        return cls("image", shape, channels, _floats(mean), _floats(std))

    @classmethod
    def video(cls, frames: int, size: int, mean=None, std=None, channels: int = 3) -> InputSpec:
        """Clips of ``frames`` square frames of side ``size``."""
        return cls("video", (frames, size, size), channels, _floats(mean), _floats(std))

    @classmethod
    def audio(cls, front_end: LogMelSettings) -> InputSpec:
        """1-channel log-mel spectrograms made by ``front_end``."""
        return cls("audio", (front_end.n_mels, front_end.frames), 1, front_end=front_end)

    @property
    def height(self) -> int:
        return self.shape[-2]

    @property
    def width(self) -> int:
        return self.shape[-1]

    @property
    def side(self) -> int:
        """The longer spatial side: what decides small-image variants and square crops."""
        return max(self.height, self.width)

    @property
    def frames(self) -> int | None:
        """Frames per clip (video), else None."""
        return self.shape[0] if self.modality == "video" else None

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so checkpoints load with torch's weights-only reader."""
        saved = asdict(self)
        saved["shape"] = list(self.shape)
        for key in ("mean", "std"):
            saved[key] = None if saved[key] is None else list(saved[key])
        return saved

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> InputSpec:
        front_end = saved.get("front_end")
        return cls(
            saved.get("modality", "image"),
            tuple(saved["shape"]),
            int(saved.get("channels", 3)),
            _floats(saved.get("mean")),
            _floats(saved.get("std")),
            None if front_end is None else LogMelSettings(**front_end),
        )

    @classmethod
    def coerce(cls, value: InputSpec | dict[str, Any] | None) -> InputSpec:
        """The spec itself, one read back from a checkpoint's hyper-parameters, or the default."""
        if value is None:
            return cls()
        return value if isinstance(value, cls) else cls.from_dict(value)


def _floats(values) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)
