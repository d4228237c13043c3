"""Audio DataModules: decoding with soundfile (wav, flac, ogg; no system packages), resampling to
one rate, fixed-length clips and a log-mel front end; samples are ``(1, n_mels, frames)``
spectrograms, so every method and image backbone takes them (``backbone_kwargs: {in_chans: 1}``)."""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile
import torch
import torchaudio
from torch import Tensor

from ssl_kit.data.base import SSLDataModule, Splits
from ssl_kit.data.cache import DecodedCache
from ssl_kit.data.datasets import LabeledFiles, SkippedFiles, TensorSamples, class_folder_samples
from ssl_kit.data.samples import Samples, Source, UnreadableFileError, open_sample
from ssl_kit.data.sources import ClassFolders, LabelsCSV, SampleSource, sample_source
from ssl_kit.data.download import download_and_extract, obtain
from ssl_kit.inputs import InputSpec, LogMelSettings
from ssl_kit.transforms.audio import AudioEval, AudioViews
from ssl_kit.transforms.base import ViewAugmentation

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".au")
TEST_SPLIT_SEED = 1234


def read_audio(path: Source | Path, sample_rate: int) -> Tensor:
    """Mono float waveform of an audio file or shard member at ``sample_rate`` (channels averaged;
    any other rate is resampled, never reinterpreted). An unreadable or empty file raises
    ``UnreadableFileError`` naming it."""
    try:
        data, rate = soundfile.read(open_sample(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        raise UnreadableFileError(f"cannot read audio file {path}: {error}") from error
    if data.shape[0] == 0:
        raise UnreadableFileError(f"audio file {path} has no samples")
    waveform = torch.from_numpy(data.mean(axis=1))
    if rate != sample_rate:
        waveform = torchaudio.functional.resample(waveform, rate, sample_rate)
    return waveform


class AudioFiles(LabeledFiles):
    """Waveforms read from audio files at ``sample_rate`` (see ``read_audio``)."""

    def __init__(self, samples: Samples, sample_rate: int, skipped: SkippedFiles | None = None, cache: DecodedCache | None = None) -> None:
        super().__init__(samples, skipped, cache)
        self.sample_rate = sample_rate

    def variant(self) -> str:
        return f"audio@{self.sample_rate}"

    def decode(self, path: Source) -> np.ndarray:
        return read_audio(path, self.sample_rate).numpy()

    def finish(self, array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.array(array))


class AudioDataModule(SSLDataModule):
    """Base of the audio DataModules: the clip length and log-mel front end (``LogMelSettings``)
    define the input, a spectrogram ``(1, n_mels, frames)`` (``input_spec``, linked into the
    model). Clips shorter than ``clip_seconds`` are zero-padded (at a random offset in training
    views, centred in evaluation); longer ones are cropped (random / centre)."""

    default_sample_rate = 16000
    mean = None  # no pixel normalisation: the front end standardises each spectrogram
    std = None

    def __init__(
        self,
        root: str | None = None,
        *args,
        sample_rate: int | None = None,
        clip_seconds: float = 1.0,
        n_mels: int = 64,
        n_fft: int = 1024,
        hop_length: int | None = None,
        f_min: float = 60.0,
        f_max: float | None = None,
        views: ViewAugmentation | None = None,
        **kwargs,
    ) -> None:
        if kwargs.get("image_size") is not None:
            raise ValueError("--data.image_size is for images: a spectrogram's size follows --data.n_mels and --data.clip_seconds")
        self.sample_rate = sample_rate or self.default_sample_rate
        self.clip_samples = int(round(clip_seconds * self.sample_rate))
        self.front_end = LogMelSettings(self.sample_rate, self.clip_samples, n_fft, hop_length, n_mels, f_min, f_max)
        super().__init__(root, *args, views=views if views is not None else AudioViews(), **kwargs)

    def describe_input(self) -> InputSpec:
        return InputSpec.audio(self.front_end)

    def configure_views(self) -> None:
        wrong = [type(part).__name__ for part in self.views.parts if not isinstance(part, AudioViews)]
        if wrong:
            raise TypeError(f"{type(self).__name__} needs AudioViews (or PairedViews of two), got {', '.join(wrong)}")
        super().configure_views()

    @property
    def eval_transform(self) -> AudioEval:
        return AudioEval(self.front_end)

    def files(self, samples: Samples) -> AudioFiles:
        return AudioFiles(samples, self.sample_rate, self.skipped_files, self.decoded_cache)


def list_audio(directory: Path, classes: list[str]) -> list[tuple[str, int]] | None:
    """The audio files of one split folder ``directory/<class>/**`` (None: no such folder)."""
    return class_folder_samples(directory, classes, AUDIO_EXTENSIONS, "audio")


#: A fold-numbered file name, ESC-50 style: ``{fold}-<name>`` (``3-100038-A-14.wav`` is in fold 3).
FOLD_NAME = re.compile(r"^(\d+)-")


def fold_split(samples: Samples, fold: int) -> tuple[Samples, Samples]:
    """``(every other fold, fold)`` of fold-numbered samples (``FOLD_NAME``); a file without a fold
    number is an error naming it, as is a fold without files."""
    train, test = [], []
    for source, label in samples:
        match = FOLD_NAME.match(Path(str(source)).name)
        if match is None:
            raise ValueError(f"{source} has no fold number: with --data.fold, name every file {{fold}}-<name> (e.g. 1-dog.wav)")
        (test if int(match[1]) == fold else train).append((source, label))
    if not test:
        raise ValueError(f"no file of fold {fold} (named {fold}-<name>) among the {len(train)} files")
    return train, test


class AudioFolderDataModule(ClassFolders, AudioDataModule):
    """Your own audio: ``root/train/<class>/*`` (wav, flac, ogg, aiff, au: any soundfile format)
    and, optionally, ``root/val/<class>/*`` and ``root/test/<class>/*``. Without ``val`` a seeded
    stratified ``val_fraction`` of train is held out. ``root`` may also be shards of such a folder
    (``python -m ssl_kit.data.shards``).

    ``labels_csv``: multi-label audio instead of class folders: the files the CSV lists under
    ``root``, each with its labels (``LabelsCSV``: header ``file,labels``, labels separated by
    ``;``), as multi-hot targets scored by mAP; test and validation are held out of them.

    ``fold``: cross-validation on fold-numbered files, ESC-50 style (``{fold}-<name>``, any class
    folder or CSV row): the files of ``fold`` are the test split, every other file trains and
    pretrains, so running each fold (a benchmark entry's ``folds``) tests every file once."""

    folder_kind = "AudioFolder"
    modality = "audio"
    list_split = staticmethod(list_audio)

    def __init__(self, root: str, *args, labels_csv: str | None = None, fold: int | None = None, **kwargs) -> None:
        self.labels_csv = labels_csv  # read by ``source`` when the base reads the classes
        self.fold = fold
        super().__init__(root, *args, **kwargs)

    @cached_property
    def source(self) -> SampleSource:
        """The files ``labels_csv`` lists, or the class folders or shards of ``root``."""
        if self.labels_csv is not None:
            return LabelsCSV(self.root, self.labels_csv)
        return sample_source(self.root, self.folder_kind, self.modality, self.list_split)

    def load_splits(self) -> Splits:
        if self.fold is None:
            return super().load_splits()
        if self.source.split("test") is not None or self.test_fraction is not None:
            raise ValueError(
                f"--data.fold {self.fold} makes fold {self.fold} the test split: {self.root} must have no test/ folder, "
                "and --data.test_fraction must be unset"
            )
        train, test = fold_split(self.source.split("train"), self.fold)
        return self.sample_splits(train, self.source.split("val"), test)


FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")
FSDD_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/heads/master.zip"


class FSDDDataModule(AudioDataModule):
    """Free Spoken Digit Dataset: ``root/recordings/{digit}_{speaker}_{take}.wav`` (8 kHz),
    downloaded there (the repository's zip) when absent and ``download`` is set.

    ``split: official``: takes 0-4 of every speaker and digit are the test set (300 clips), the
    rest is train, with a seeded stratified ``val_fraction`` held out. ``split: speaker``: every
    clip of ``test_speaker`` is the test set (an unseen voice), the rest as above.
    """

    num_classes = 10
    default_sample_rate = 8000
    default_val_fraction = 0.1

    def __init__(self, root: str, *args, split: Literal["official", "speaker"] = "official", test_speaker: str = "theo", **kwargs) -> None:
        super().__init__(root, *args, **kwargs)
        self.split = split
        self.test_speaker = test_speaker

    def load_splits(self) -> Splits:
        root = Path(self.root).expanduser()
        folder = root / "recordings"
        obtain(
            lambda: any(folder.glob("*.wav")),
            lambda: download_and_extract(FSDD_URL, root),
            self.download,
            f"FSDD recordings not found: expected {folder}/<digit>_<speaker>_<take>.wav (the recordings/ folder "
            f"of {FSDD_URL}; ../shared/data/fsdd is a copy)",
        )
        train, test = [], []
        for path in sorted(folder.glob("*.wav")):
            match = FSDD_NAME.match(path.name)
            if match is None:
                continue
            digit, speaker, take = int(match[1]), match[2], int(match[3])
            held_out = take < 5 if self.split == "official" else speaker == self.test_speaker
            (test if held_out else train).append((str(path), digit))
        if not train or not test:
            raise ValueError(f"{folder}: the {self.split} split leaves {len(train)} train and {len(test)} test clips")
        return self.sample_splits(train, None, test)


class SyntheticAudioDataModule(AudioDataModule):
    """Embedded default, generated (seeded) so nothing is downloaded: 10 classes of 1 s "calls"
    at 8 kHz. Class ``c`` is a harmonic tone whose pitch glides by ``(c % 5 - 2)`` semitones per
    100 ms (falling, flat, rising), amplitude-modulated at ``2 + 3 * (c // 5)`` Hz, with random
    base pitch (150-400 Hz), onset, duration, loudness and background noise, so neither pitch nor
    level gives the class away. 20% is the fixed test set, then ``val_fraction`` of the rest."""

    num_classes = 10
    default_sample_rate = 8000
    default_val_fraction = 0.2

    def __init__(self, *args, samples_per_class: int = 120, generator_seed: int = 0, **kwargs) -> None:
        super().__init__(None, *args, **kwargs)
        self.samples_per_class = samples_per_class
        self.generator_seed = generator_seed

    def generate(self) -> tuple[Tensor, np.ndarray]:
        rng = np.random.default_rng(self.generator_seed)
        rate, length = self.sample_rate, self.sample_rate
        t = np.arange(length) / rate
        waves, labels = [], []
        for label in np.repeat(np.arange(self.num_classes), self.samples_per_class):
            glide, beat = label % 5 - 2, 2 + 3 * (label // 5)
            onset, duration = rng.uniform(0.0, 0.3), rng.uniform(0.4, 0.7)
            local = np.clip(t - onset, 0, duration)
            pitch = rng.uniform(150, 400) * 2 ** (glide * local * 10 / 12)
            phase = 2 * np.pi * np.cumsum(pitch) / rate
            tone = sum(np.sin(k * phase) / k for k in (1, 2, 3))
            envelope = ((t >= onset) & (t <= onset + duration)) * (0.6 + 0.4 * np.sin(2 * np.pi * beat * t))
            wave = rng.uniform(0.1, 0.5) * tone * envelope + rng.uniform(0.002, 0.02) * rng.standard_normal(length)
            waves.append(wave.astype(np.float32))
            labels.append(label)
        return torch.from_numpy(np.stack(waves)), np.array(labels)

    def load_splits(self) -> Splits:
        waves, labels = self.generate()
        return self.fixed_test_splits(TensorSamples, waves, labels, TEST_SPLIT_SEED)


SPEECH_COMMANDS_URL = "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"


class SpeechCommandsDataModule(AudioDataModule):
    """Speech Commands v2: ``root/<word>/<clip>.wav`` (16 kHz, 1 s) with the official
    ``validation_list.txt`` and ``testing_list.txt``; every other clip is train. The 35 words are
    the classes (``_background_noise_`` is not one). Downloaded there (2.3 GB) when absent and
    ``download`` is set."""

    num_classes = 35
    default_sample_rate = 16000

    def load_splits(self) -> Splits:
        root = Path(self.root).expanduser()
        lists = {name: root / f"{name}_list.txt" for name in ("validation", "testing")}
        missing = [str(path) for path in lists.values() if not path.is_file()]
        obtain(
            lambda: all(path.is_file() for path in lists.values()),
            lambda: download_and_extract(SPEECH_COMMANDS_URL, root),
            self.download,
            f"Speech Commands v2 not found in {root}: missing {', '.join(missing)}. Extract {SPEECH_COMMANDS_URL} "
            "there (root/<word>/*.wav plus the list files).",
        )
        words = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
        if len(words) != self.num_classes:
            raise ValueError(f"{root} has {len(words)} word folders, expected the {self.num_classes} of Speech Commands v2")
        index = {word: i for i, word in enumerate(words)}
        held = {name: set(path.read_text().split()) for name, path in lists.items()}
        parts: dict[str, list[tuple[str, int]]] = {"train": [], "validation": [], "testing": []}
        for word in words:
            for path in sorted((root / word).glob("*.wav")):
                relative = f"{word}/{path.name}"
                part = next((name for name, members in held.items() if relative in members), "train")
                parts[part].append((str(path), index[word]))
        train = self.files(parts["train"])
        return Splits(pretrain=train, train=train, val=self.files(parts["validation"]), test=self.files(parts["testing"]))


ESC50_URL = "https://github.com/karolpiczak/ESC-50/archive/master.zip"


class ESC50DataModule(AudioDataModule):
    """ESC-50: ``root/meta/esc50.csv`` (filename, fold, target, ...) and ``root/audio/*.wav``
    (44.1 kHz, 5 s, 50 classes, 5 folds; the repository's zip is downloaded there when absent
    and ``download`` is set). ``fold`` is the test fold (the benchmark is the mean
    over the 5); a seeded stratified ``val_fraction`` of the other folds is held out for validation."""

    num_classes = 50
    default_sample_rate = 16000

    def __init__(self, root: str, *args, fold: int = 1, clip_seconds: float = 5.0, **kwargs) -> None:
        super().__init__(root, *args, clip_seconds=clip_seconds, **kwargs)
        if fold not in range(1, 6):
            raise ValueError(f"ESC-50 fold must be 1-5, got {fold}")
        self.fold = fold

    def load_splits(self) -> Splits:
        import csv

        root = Path(self.root).expanduser()
        meta = root / "meta" / "esc50.csv"
        obtain(
            meta.is_file,
            lambda: download_and_extract(ESC50_URL, root),
            self.download,
            f"ESC-50 not found: expected {meta} and {root / 'audio'}/*.wav (the meta/ and audio/ folders of {ESC50_URL})",
        )
        with meta.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        missing = {"filename", "fold", "target"} - set(rows[0] if rows else {})
        if missing:
            raise ValueError(f"{meta} lacks the column(s) {', '.join(sorted(missing))}")
        train, test = [], []
        for row in rows:
            sample = (str(root / "audio" / row["filename"]), int(row["target"]))
            (test if int(row["fold"]) == self.fold else train).append(sample)
        return self.sample_splits(train, None, test)
