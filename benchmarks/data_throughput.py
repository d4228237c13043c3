"""Data-loading throughput per modality against the model's consumption rate: which side is the bottleneck?

Each source is the DataModule and method of a config (``configs/simclr_*.yaml``: sizes, batch,
training views, backbone, optimizer), built by ssl_kit's CLI. Loader rate: samples/s of the real
pretraining loader, training augmentations included, at each ``--workers`` count, over whole
batches for ``--seconds`` (epochs wrap around, as in training) after a warm-up of one batch per
worker; the time to the first batch (worker start-up) is reported apart. Audio also in seconds of
audio (clip length) per second, video in frames (of the clips) per second. Model rate: samples/s
of the method's step (``training_loss``, backward, the config's optimizer) on random views of the
shapes that loader yields, same batch size, over whole steps for ``--seconds`` after a warm-up
step. "data-bound" when the loader is slower than the model. Each side is timed alone: on a
CPU-only machine they share the cores in real training, so there both rates are upper bounds. With
0 workers nothing overlaps: a training step costs the loading time plus the model time.

Decoded-sample cache (``--data.cache_dir``): the first and the second epoch over a folder, each
a whole pass of the pretraining loader, without and with the cache (filled in the first epoch):
ESC-50-style 5-second 44.1 kHz OGG clips read at 16 kHz (every epoch decodes and resamples them
without the cache), the mp4 clips, and 32 px JPEGs (CIFAR-10-sized).

Besides the embedded in-memory sets, files decoded on the fly, written once into a temporary
folder from the embedded generators: PNG ImageFolder of the scikit-learn digits, wav AudioFolder
of the synthetic audio, mp4 VideoFolder (PyAV) of 16-frame moving digits (clips read as the
config says: 8 frames, 2 apart). Real data when given: MNIST idx (``--mnist-root``,
configs/simclr_mnist.yaml) and FSDD wav (``--fsdd-root``, configs/simclr_fsdd.yaml).

    python benchmarks/data_throughput.py
    python benchmarks/data_throughput.py --cache-only --workers 2 --out benchmarks/results/data_cache_cpu.txt
    python benchmarks/data_throughput.py --mnist-root ../shared/data/mnist --fsdd-root ../shared/data/fsdd \\
        --workers 0 2 --out benchmarks/results/data_throughput_cpu.txt
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import logging
import os
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image

from ssl_kit.cli import SSLCLI
from ssl_kit.data import MovingDigitsDataModule, SyntheticAudioDataModule
from ssl_kit.data.video import MOTIONS
from ssl_kit.optim import build_optimizer, decay_groups
from throughput import sync

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Source:
    modality: str
    name: str
    config: str
    data_args: list[str]  # CLI overrides of the config's data section


@dataclass
class Row:
    source: Source
    views: str  # "2 x (3, 16, 16)": number of views x one sample's shape
    batch_size: int
    workers: int
    first_batch_s: float
    batches: int
    loader_rate: float
    model_rate: float
    per_sample: float  # seconds of audio or frames per sample; 0 for images


# -- file sources, written once from the embedded generators -----------------------------------
def write_png_folder(root: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # as DigitsDataModule reads them
    for index, (image, label) in enumerate(zip(images, digits.target)):
        folder = root / "train" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index}.png")
    return root


def write_wav_folder(root: Path) -> Path:
    generator = SyntheticAudioDataModule()
    waves, labels = generator.generate()
    for index, (wave, label) in enumerate(zip(waves.numpy(), labels)):
        folder = root / "train" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        soundfile.write(folder / f"{index}.wav", wave, generator.sample_rate, subtype="PCM_16")
    return root


def write_mp4_folder(root: Path, frames: int = 16) -> Path:
    """Longer than the 8 x 2 frames a clip spans, so clip sampling has room, as in real videos."""
    import av

    clips, labels = MovingDigitsDataModule(frames_per_clip=frames).generate()
    for index, (clip, label) in enumerate(zip(clips.numpy(), labels)):
        folder = root / "train" / MOTIONS[label].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        with av.open(str(folder / f"{index}.mp4"), mode="w") as container:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height = clip.shape[2], clip.shape[1]
            stream.pix_fmt = "yuv420p"
            for frame in clip:
                rgb = np.repeat(frame[:, :, None], 3, axis=2)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
            container.mux(stream.encode())
    return root


def write_ogg_folder(root: Path, clips: int = 40, seconds: float = 5.0, rate: int = 44100) -> Path:
    """ESC-50-like clips: 5 s of 44.1 kHz OGG (Vorbis), noise bands that differ by class."""
    rng = np.random.default_rng(0)
    for index in range(clips):
        label = index % 4
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        t = np.arange(int(seconds * rate)) / rate
        wave = 0.3 * np.sin(2 * np.pi * (300 + 400 * label) * t) + 0.05 * rng.standard_normal(t.size)
        soundfile.write(folder / f"{index}.ogg", wave.astype(np.float32), rate, format="OGG", subtype="VORBIS")
    return root


def write_jpeg_folder(root: Path, images: int = 2000, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for index in range(images):
        folder = root / "train" / f"class{index % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index}.jpg", quality=90)
    return root


def cache_sources(scratch: Path) -> list[Source]:
    ogg = ["--data", "AudioFolderDataModule", "--data.root", str(write_ogg_folder(scratch / "ogg")), "--data.sample_rate", "16000",
           "--data.clip_seconds", "5.0", "--data.batch_size", "8"]  # fmt: skip
    mp4 = ["--data", "VideoFolderDataModule", "--data.root", str(write_mp4_folder(scratch / "mp4-cache")), "--data.batch_size", "16"]
    jpeg = ["--data.root", str(write_jpeg_folder(scratch / "jpeg")), "--data.num_workers", "2"]
    return [
        Source("audio", "5 s 44.1 kHz OGG clips at 16 kHz", "simclr_synthetic_audio.yaml", ogg),
        Source("video", "moving digits, mp4 files", "simclr_moving_digits.yaml", mp4),
        Source("image", "32 px JPEG files", "simclr_cifar10_cpu.yaml", jpeg),
    ]


def epoch_rates(datamodule, workers: int) -> tuple[float, float]:
    """Samples/s of the first and the second whole pass over the pretraining loader."""
    datamodule.num_workers = workers
    loader = datamodule.train_dataloader()
    rates = []
    for _ in range(2):
        start, samples = time.perf_counter(), 0
        for views, _ in loader:
            samples += len(views[0])
        rates.append(samples / (time.perf_counter() - start))
    return rates[0], rates[1]


def cache_table(scratch: Path, workers: int) -> list[str]:
    lines = [f"## decoded-sample cache (--data.cache_dir), {workers} workers: samples/s of the first and second epoch", "",
             "| source | cache | epoch 1 | epoch 2 | epoch 2 / epoch 1 |", "|---|---|---:|---:|---:|"]  # fmt: skip
    for source in cache_sources(scratch):
        for cached in (False, True):
            extra = ["--data.cache_dir", str(scratch / f"cache-{source.modality}")] if cached else []
            datamodule, _ = build(Source(source.modality, source.name, source.config, [*source.data_args, *extra]))
            first, second = epoch_rates(datamodule, workers)
            line = f"| {source.name} | {'on' if cached else 'off'} | {first:.1f} | {second:.1f} | {second / first:.1f}x |"
            print(line, flush=True)
            lines.append(line)
    return lines


def sources(args, scratch: Path) -> list[Source]:
    found = [
        Source("image", "digits, embedded", "simclr_digits.yaml", []),
        Source("image", "digits, PNG files", "simclr_digits.yaml",
               ["--data", "ImageFolderDataModule", "--data.root", str(write_png_folder(scratch / "png"))]),
    ]  # fmt: skip
    if args.mnist_root:
        found.append(Source("image", "MNIST, idx", "simclr_mnist.yaml", ["--data.root", args.mnist_root]))
    found += [
        Source("audio", "synthetic, embedded", "simclr_synthetic_audio.yaml", []),
        Source("audio", "synthetic, wav files", "simclr_synthetic_audio.yaml",
               ["--data", "AudioFolderDataModule", "--data.root", str(write_wav_folder(scratch / "wav")), "--data.sample_rate", "8000"]),
    ]  # fmt: skip
    if args.fsdd_root:
        found.append(Source("audio", "FSDD, wav files", "simclr_fsdd.yaml", ["--data.root", args.fsdd_root]))
    found += [
        Source("video", "moving digits, embedded", "simclr_moving_digits.yaml", []),
        Source("video", "moving digits, mp4 files", "simclr_moving_digits.yaml",
               ["--data", "VideoFolderDataModule", "--data.root", str(write_mp4_folder(scratch / "mp4"))]),
    ]  # fmt: skip
    return found


# -- the two rates --------------------------------------------------------------------------------
def loader_rate(datamodule, workers: int, seconds: float) -> tuple[float, int, float, list[tuple[int, ...]]]:
    """Seconds to the first batch, batches timed, samples/s and the views' shapes. Whole batches
    are timed until ``seconds`` have passed, after one warm-up batch per worker, so that every
    worker has just started its next batch when timing starts."""
    datamodule.num_workers = workers
    loader = datamodule.train_dataloader()
    forever = (batch for _ in itertools.count() for batch in loader)  # epochs wrap around, as in training

    def next_views():
        views, _ = next(forever)
        return datamodule.views.on_device(views)

    started = time.perf_counter()
    next_views()
    first_batch = time.perf_counter() - started
    for _ in range(workers - 1):
        next_views()
    start = time.perf_counter()
    batches = 0
    while batches == 0 or time.perf_counter() - start < seconds:
        views = next_views()
        batches += 1
    elapsed = time.perf_counter() - start
    forever.close()
    return first_batch, batches, batches * datamodule.batch_size / elapsed, [tuple(view.shape) for view in views]


def model_rate(model, shapes: list[tuple[int, ...]], seconds: float, device: torch.device) -> float:
    """Samples/s of the method's optimisation step on random views: whole steps until ``seconds``
    have passed, after one untimed warm-up step (first-call allocations)."""
    model = model.to(device).train()
    hp = model.hparams
    optimizer = build_optimizer(
        hp.optimizer, decay_groups(model.trained_modules(), hp.weight_decay), hp.lr, hp.momentum, hp.betas, hp.nesterov
    )
    views = [torch.randn(shape, device=device) for shape in shapes]

    def step() -> None:
        loss, _ = model.training_loss(views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)

    step()
    start = time.perf_counter()
    steps = 0
    while steps == 0 or time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps * shapes[0][0] / (time.perf_counter() - start)


# -- report ---------------------------------------------------------------------------------------
UNITS = {"image": ("images/s", None), "audio": ("clips/s", "audio s/s"), "video": ("clips/s", "frames/s")}


def table(modality: str, rows: list[Row]) -> list[str]:
    unit, extra = UNITS[modality]
    header = f"  {'source':<26}{'config':<29}{'views':<20}{'batch':>6}{'workers':>8}{'first batch s':>14}{'batches':>8}{unit:>10}"
    header += f"{extra:>10}" if extra else ""
    header += f"{'model ' + unit:>16}{'loader/model':>13}  bottleneck"
    return [modality, header] + [row_line(row, extra is not None) for row in rows]


def row_line(row: Row, extra: bool) -> str:
    ratio = row.loader_rate / row.model_rate
    line = f"  {row.source.name:<26}{row.source.config:<29}{row.views:<20}{row.batch_size:>6}{row.workers:>8}"
    line += f"{row.first_batch_s:>14.2f}{row.batches:>8}{row.loader_rate:>10.1f}"
    line += f"{row.loader_rate * row.per_sample:>10.1f}" if extra else ""
    return line + f"{row.model_rate:>16.1f}{ratio:>13.2f}  {'data-bound' if ratio < 1 else 'model-bound'}"


def build(source: Source):
    """The config's DataModule (set up) and method, as ``python -m ssl_kit.fit`` would build them."""
    cli = SSLCLI(
        args=["--config", str(CONFIGS / source.config), *source.data_args, "--trainer.logger", "false"],
        run=False,
    )
    cli.datamodule.setup("fit")
    return cli.datamodule, cli.model


def per_sample(modality: str, datamodule) -> float:
    if modality == "audio":
        return datamodule.clip_samples / datamodule.sample_rate
    if modality == "video":
        return datamodule.frames_per_clip
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values to time")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds (whole batches or steps) per measurement")
    parser.add_argument("--mnist-root", help="MNIST idx files, e.g. ../shared/data/mnist")
    parser.add_argument("--fsdd-root", help="Free Spoken Digit Dataset, e.g. ../shared/data/fsdd")
    parser.add_argument("--note", default="", help="a line for the report, e.g. how busy the machine was")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--cache-only", action="store_true", help="only the decoded-sample cache's epochs")
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric"):  # the CLI's per-build seed and device lines
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", "LightningCLI's args parameter")  # this script's own flags are in sys.argv
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"$ python {shlex.join(sys.argv)}",
        f"# {datetime.date.today()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, model on {where}, "
        f"load average at start {os.getloadavg()[0]:.1f}",
    ]
    if args.note:
        lines.append(f"# {args.note}")
    model_rates: dict[tuple, float] = {}  # a step's cost depends on method, backbone, optimizer and shapes only
    rows: dict[str, list[Row]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        cache_lines = cache_table(Path(scratch), max(args.workers))
        for source in [] if args.cache_only else sources(args, Path(scratch)):
            datamodule, model = build(source)
            hp = model.hparams
            for workers in args.workers:
                first_batch, batches, rate, shapes = loader_rate(datamodule, workers, args.seconds)
                key = (type(model).__name__, hp.backbone, repr(hp.backbone_kwargs), hp.optimizer, tuple(shapes))
                if key not in model_rates:
                    model_rates[key] = model_rate(model, shapes, args.seconds, device)
                views = f"{len(shapes)} x {shapes[0][1:]}"
                row = Row(source, views, shapes[0][0], workers, first_batch, batches, rate, model_rates[key],
                          per_sample(source.modality, datamodule))  # fmt: skip
                rows.setdefault(source.modality, []).append(row)
                print(source.modality, row_line(row, source.modality != "image"), flush=True)
    lines.append(f"# load average at end {os.getloadavg()[0]:.1f}")
    for modality, modality_rows in rows.items():
        lines += ["", *table(modality, modality_rows)]
    lines += ["", *cache_lines]
    report = "\n".join(lines)
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
