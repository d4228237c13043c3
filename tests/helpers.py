"""Shared test helpers: tiny, fast configurations of the real CLI, the random-init yardstick, and media
files written in the real formats."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Small enough for 2 CPU cores: 2 batches per epoch, in-process loading.
TINY_RUN = [
    "--data.num_workers", "0",
    "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "2",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.accelerator", "cpu",
]  # fmt: skip
# Images: the digits at 8 px (their native size). Audio and video DataModules derive their sample
# size from the clip and the front end, so they use TINY_RUN alone.
TINY = ["--data.image_size", "8", "--data.batch_size", "32", *TINY_RUN]

#: Learning checks of the ResNet methods: two epochs on a fixed 5,000-image subset of the real MNIST
#: at 16 px (78 steps at batch 128) with ``resnet18_slim`` (ResNet-18 with half-width stages, the
#: CIFAR stem): about 80 s of training on 2 CPU cores, where the full-width ResNet-18 took 190 s for
#: the same margin over random init. The embedded digits are too easy for this: random-init ResNet
#: features reach 0.93 kNN / 0.96 linear there, and 20 SimCLR epochs only draw level.
MNIST_RUN = [
    "--data.root", str(SHARED_DATA / "mnist"), "--data.image_size", "16", "--data.batch_size", "128",
    "--data.train_subset", "5000", "--data.eval_subset", "1000", "--data.num_workers", "2",
    "--trainer.max_epochs", "2", "--model.warmup_epochs", "0.5", "--model.backbone", "resnet18_slim",
    "--trainer.limit_train_batches", "1.0", "--trainer.limit_val_batches", "1.0", "--trainer.check_val_every_n_epoch", "2",
]  # fmt: skip
needs_mnist = pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="../shared/data/mnist is absent")


def run_command(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, timeout=timeout)`` in a session of its
    own, whose every process is killed on timeout. ``subprocess.run`` kills only the child it
    started: the ranks that torchrun, Lightning's DDP or ``srun`` started would keep the output
    pipes open, and its last read of them would wait for ever."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            raise AssertionError(f"{command[:4]}... ran past {timeout} s; its log ends:\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def fit(config: str, root: Path, *overrides: str, base: list[str] = TINY):
    """Runs ``python -m ssl_kit.fit`` in-process and returns the LightningCLI object."""
    from ssl_kit.fit import main

    return main(["--config", str(REPO / "configs" / config), "--trainer.default_root_dir", str(root), *base, *overrides])


def fresh_copy(model, **overrides):
    """The same method and hyper-parameters (or ``overrides``) at random init, seeded like the trained runs."""
    import lightning as L

    L.seed_everything(0)
    hparams = {k: v for k, v in model.hparams.items() if not k.startswith("_")}
    return type(model)(**{**hparams, **overrides})


def configured_optimizer(model, total_steps: int = 10):
    """``model.configure_optimizers()``'s optimizer without a Trainer: the attributes its budget reads
    stand in for one (one epoch of ``total_steps``)."""
    from types import SimpleNamespace

    model._trainer = SimpleNamespace(
        estimated_stepping_batches=total_steps, train_dataloader=[], num_training_batches=total_steps, accumulate_grad_batches=1
    )
    try:
        return model.configure_optimizers()["optimizer"]
    finally:
        model._trainer = None


def against_random_init(cli, label: str) -> dict[str, tuple[float, float]]:
    """Accuracy of a trained run's backbone and of the same method at random init, by protocol:
    ``knn`` (the online monitor's: train bank -> validation set, the method's k and temperature)
    and ``linear`` (the benchmark's probe on frozen features: trained on the same bank, chosen on
    validation, top-1 on test). Printed, so "learns" is measured against random-init features,
    a strong baseline (ResNets start with their residual branches on, as in torchvision)."""
    from ssl_kit.evaluation import extract, knn, linear_probe

    data, model = cli.datamodule, cli.model
    bank, val = data.val_dataloader()
    loaders = {"bank": bank, "val": val, "test": data.test_dataloader()}
    accuracy = {}
    for name, backbone in {"trained": model.backbone, "random init": fresh_copy(model).backbone}.items():
        features = {split: extract(backbone, loader) for split, loader in loaders.items()}
        accuracy[name] = {
            "knn": knn(features["bank"], features["val"], data.num_classes, model.hparams.knn_k, model.hparams.knn_temperature),
            "linear": linear_probe(features["bank"], features["val"], features["test"], data.num_classes).test_top1,
        }
    result = {protocol: (accuracy["trained"][protocol], accuracy["random init"][protocol]) for protocol in ("knn", "linear")}
    shown = "; ".join(f"{protocol} trained {trained:.3f} vs random init {random:.3f}" for protocol, (trained, random) in result.items())
    print(f"{label}: {shown} after {cli.trainer.global_step} steps")
    return result


# -- media files in the real formats ---------------------------------------------------------
def tone(frequency: float, rate: int, seconds: float = 0.5, channels: int = 1) -> np.ndarray:
    """A sine of ``frequency`` Hz at half amplitude, mono or ``channels`` identical channels."""
    t = np.arange(int(rate * seconds)) / rate
    wave = (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def write_audio_folder(root, corrupt: bool = False):
    """``root/{train,test}/{high,low}/`` tones in wav, flac and ogg (and a corrupt file in train)."""
    import soundfile

    rate = 16000
    for split, takes in (("train", 6), ("test", 2)):
        for label, (name, freq) in enumerate((("high", 1200.0), ("low", 200.0))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for take in range(takes):
                fmt = (".wav", ".flac", ".ogg")[take % 3]
                soundfile.write(folder / f"{take}{fmt}", tone(freq * (1 + 0.02 * take), rate, seconds=0.3 + 0.2 * take), rate)
    if corrupt:
        (root / "train" / "high" / "broken.wav").write_bytes(b"garbage")


def write_fold_audio_folder(root, folds: int = 3, takes: int = 2) -> list[str]:
    """``root/train/{high,low}/{fold}-{take}.wav``: ESC-50-style fold-numbered tones, 0.1 s at 8 kHz,
    ``takes`` per class and fold; returns their paths."""
    import soundfile

    paths = []
    for name, frequency in (("high", 1200.0), ("low", 200.0)):
        (root / "train" / name).mkdir(parents=True)
        for fold in range(1, folds + 1):
            for take in range(takes):
                path = root / "train" / name / f"{fold}-{take}.wav"
                soundfile.write(path, tone(frequency * (1 + 0.05 * take + 0.01 * fold), 8000, seconds=0.1), 8000)
                paths.append(str(path))
    return paths


def write_tagged_clips(root) -> Path:
    """Multi-label audio: ``root/clips/{fold}-<name>.wav`` (folds 1-3, two clips each, 0.1 s at 8 kHz)
    and ``root/labels.csv`` giving each 1 or 2 of the tags bird, dog, rain (``;``-separated, one
    with a space to strip); returns the CSV's path."""
    import soundfile

    tags = {"1-a.wav": "dog", "1-b.wav": "dog;rain", "2-c.wav": "rain", "2-d.wav": "bird; dog", "3-e.wav": "bird", "3-f.wav": "rain;bird"}
    (root / "clips").mkdir(parents=True)
    for i, name in enumerate(tags):
        soundfile.write(root / "clips" / name, tone(200.0 + 100 * i, 8000, seconds=0.1), 8000)
    path = root / "labels.csv"
    path.write_text("file,labels\n" + "".join(f"clips/{name},{labels}\n" for name, labels in tags.items()))
    return path


def files_of(dataset) -> list[str]:
    """The files of a file-backed split, in its order, through ``Transformed`` index views."""
    from ssl_kit.data.datasets import Transformed

    if isinstance(dataset, Transformed):
        files = files_of(dataset.base)
        return [files[i] for i in dataset.indices]
    return [str(source) for source, _ in dataset.samples]


def write_mp4(path, frames: int = 12, size: int = 32, shade: int = 0) -> None:
    """An mpeg4 clip of a white bar moving right on a ``shade`` background."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((size, size, 3), shade, dtype=np.uint8)
            image[:, (2 * i) % size] = 255  # a bar moving right
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_video_folder(root, videos: dict[str, int], frames: int = 10) -> None:
    """``root/<split>/{a,b}/<i>.mp4``: ``videos[split]`` clips per class (``write_mp4``), class b on a grey background."""
    for split, count in videos.items():
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                write_mp4(root / split / cls / f"{i}.mp4", frames=frames, shade=0 if cls == "a" else 90)


def mean_teacher_learning_run(epochs: int) -> list[str]:
    """The self-training learning checks' run on the embedded digits (5 labels per class): 24 px
    through the standard ResNet stem (6x6 maps after it: 4x cheaper than the CIFAR stem at 16 px,
    with the same measured gain), teacher EMA 0.9, validated once at the end; about 22 optimizer
    steps per epoch over the unlabeled pool."""
    return [
        "--trainer.max_epochs", str(epochs), "--trainer.limit_train_batches", "1.0", "--trainer.limit_val_batches", "1.0",
        "--trainer.check_val_every_n_epoch", str(epochs), "--trainer.num_sanity_val_steps", "0",
        "--data.image_size", "24", "--model.small_image", "false", "--data.batch_size", "16", "--model.ema_momentum", "0.9",
    ]  # fmt: skip
