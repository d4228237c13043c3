"""End-to-end pretraining speed against lightly's documented pipeline, and where the time goes.

One run, everything side by side, in rounds (each round times every measurement once, in the same
order) so that machine drift hits all of them; the report gives per-round values and medians.

* **lightly**: lightly's documented Barlow Twins (``examples/pytorch_lightning/barlowtwins.py``): a
  ``pytorch_lightning`` module with torchvision's ResNet-18 without ``fc``, lightly's
  ``BarlowTwinsProjectionHead(512, 2048, 2048)`` and ``BarlowTwinsLoss``, ``SGD(lr=0.06)``, views
  from lightly's ``BYOLTransform`` (blur off at this size, as the example does for CIFAR-10) per
  sample on PIL images in the loader workers (batch, shuffle, ``drop_last``, ``--workers``).
* **ssl_kit**: ``BarlowTwins`` (timm's ResNet-18 with the standard stem, ``small_image=False``, the
  same projector sizes, loss weight and SGD) with ``BatchedImageViews`` of the same BYOL views:
  workers only turn the PIL image into uint8, the views are computed per batch on the device. Its
  DataModule's defaults otherwise (pinned memory where CUDA is, persistent workers).
  Both read the same dataset object: ``--images`` CIFAR-10-sized random RGB images made as PIL
  images per item from a uint8 array, like torchvision's CIFAR10.
* **compute-only**: ssl_kit's same step (same Trainer, model, optimizer) on random in-memory views
  (no loader work): the ceiling for the end-to-end rate.
* **plain loop**: ``throughput.py``'s textbook PyTorch loop of the same step; ratio ssl_kit /
  plain and peak memory of each, each measured once in a fresh spawned process (a round's
  steps): the growth of the peak RSS (reset first) over the RSS just before the model is built
  (host memory: the CPU allocator keeps no peak counter; Linux only) and, on CUDA,
  ``torch.cuda.max_memory_allocated``.
* **FLOP/s**: FLOPs of one step (forward + backward of the method loss, counted by
  ``torch.utils.flop_counter.FlopCounterMode``: matmuls and convolutions) times the measured step
  rate, as a fraction of the matrix-multiply peak measured in this run (best of several square
  ``torch.mm`` in the step's dtype).
* **options**: each speed option against the compute-only baseline (``channels_last``,
  ``bf16-mixed`` and on CUDA ``16-mixed``, ``compile_backbone``, ``fused_optimizer``);
  ``persistent_workers`` off against on in ssl_kit's end-to-end run with short epochs
  (``--epoch-steps`` batches, so that workers would restart several times); on CUDA
  ``pin_memory`` off against on end to end.

    python benchmarks/pipeline_speed.py --steps 2 --warmup 1 --rounds 1 --batch-size 32 --out /tmp/smoke.txt   # smoke run
    python benchmarks/pipeline_speed.py    # writes benchmarks/results/pipeline_speed_cpu.txt (about 25 min on 2 idle cores)
    python benchmarks/pipeline_speed.py --device cuda --workers 8    # writes benchmarks/results/pipeline_speed_cuda.txt
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.metadata
import logging
import multiprocessing
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from ssl_kit.data.base import SSLDataModule, Splits
from ssl_kit.data.datasets import Transformed
from ssl_kit.transforms import BatchedImageViews
from throughput import StepTiming, make_model, sync, time_plain, time_ssl_kit, timed_fit, trainer_options

RESULTS = Path(__file__).resolve().parent / "results"
#: ssl_kit's settings of lightly's example: its backbone (torchvision's stem) and its plain SGD.
RECIPE = dict(small_image=False, lr=0.06, momentum=0.0, weight_decay=0.0)


class RandomImages(Dataset):
    """``(PIL image, label)`` pairs made per item from a uint8 array, as torchvision's CIFAR10 does."""

    def __init__(self, count: int, size: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
        self.labels = rng.integers(0, 10, count)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])


# -- lightly's documented pipeline ----------------------------------------------------------------
class LightlyBarlowTwins(pl.LightningModule):
    """lightly's ``examples/pytorch_lightning/barlowtwins.py`` module."""

    def __init__(self) -> None:
        super().__init__()
        resnet = torchvision.models.resnet18()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = BarlowTwinsProjectionHead(512, 2048, 2048)
        self.criterion = BarlowTwinsLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def training_step(self, batch, batch_index):
        x0, x1 = batch[0]
        return self.criterion(self.forward(x0), self.forward(x1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.06)


class LightlyStepTimer(StepTiming, pl.Callback):
    pass


def time_lightly(images: Dataset, args, device: torch.device) -> float:
    torch.manual_seed(0)
    transform = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=args.image_size, gaussian_blur=0.0),
        view_2_transform=BYOLView2Transform(input_size=args.image_size, gaussian_blur=0.0),
    )
    loader = DataLoader(
        Transformed(images, transform), batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers
    )
    timer = LightlyStepTimer(args.warmup, device)
    pl.Trainer(callbacks=[timer], **trainer_options(args, device)).fit(LightlyBarlowTwins(), train_dataloaders=loader)
    return timer.rate(args.batch_size)


# -- ssl_kit end to end ---------------------------------------------------------------------------
class ImagesDataModule(SSLDataModule):
    """The benchmark's images as an ssl_kit DataModule (only its training loader is used)."""

    num_classes = 10

    def __init__(self, images: Dataset, **kwargs) -> None:
        self.images = images
        super().__init__(**kwargs)

    def load_splits(self) -> Splits:
        return Splits(pretrain=self.images, train=self.images, val=self.images)


def time_ssl_kit_pipeline(images: Dataset, args, device: torch.device, epoch_steps: int | None = None, **data_options) -> float:
    """ssl_kit end to end; ``epoch_steps``: epochs of that many batches (to see worker restarts)."""
    views = BatchedImageViews(blur_prob=0.0, solarize_prob=[0.0, 0.2])  # BYOL's views without blur, as lightly's
    data = ImagesDataModule(
        images, batch_size=args.batch_size, num_workers=args.workers, image_size=args.image_size, views=views, **data_options
    )
    return timed_fit(make_model(args, **RECIPE), args, device, epoch_steps, datamodule=data)


# -- FLOPs, matmul peak, memory ---------------------------------------------------------------------
def step_flops(args, device: torch.device) -> int:
    """FLOPs of one training step's forward and backward (the method loss), counted by torch."""
    model = make_model(args, **RECIPE).to(device).train()
    views = [torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device) for _ in range(2)]
    with FlopCounterMode(display=False) as counter, torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16-mixed"):
        loss, _ = model.training_loss(views)
        loss.backward()
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of square ``torch.mm`` over sizes and repeats: the machine's practical peak."""
    best = 0.0
    for n in (1024, 2048, 4096) if device.type == "cpu" else (4096, 8192):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        torch.mm(a, b)
        repeats = 3 if device.type == "cpu" else 20
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                torch.mm(a, b)
            sync(device)
            best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (Linux) in MiB: VmRSS (now), VmHWM (peak)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def peak_memory(side: str, args, device_name: str) -> dict[str, float]:
    """Run in a fresh process: peak memory growth (MiB) of a run of ``side``, model building
    included. The peak RSS is reset first (``/proc/self/clear_refs``), so the imports' own peak
    does not hide it."""
    device = torch.device(device_name)
    Path("/proc/self/clear_refs").write_text("5")
    before = status_mib("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    (time_ssl_kit if side == "ssl_kit" else time_plain)(args, device, **RECIPE)
    usage = {"host RSS": status_mib("VmHWM") - before}
    if device.type == "cuda":
        usage["CUDA allocated"] = torch.cuda.max_memory_allocated() / 2**20
    return usage


def measure_in_fresh_process(function: Callable, *arguments):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=quiet) as pool:
        return pool.submit(function, *arguments).result()


# -- the run -------------------------------------------------------------------------------------------
def quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*validation_step.*")


def measurements(images: Dataset, args, device: torch.device) -> dict[str, Callable[[], float]]:
    """Each measurement's samples/s (pairs of views per second), in the order a round runs them."""

    def variant(**changes) -> argparse.Namespace:
        return argparse.Namespace(**{**vars(args), **changes})

    runs: dict[str, Callable[[], float]] = {
        "lightly end to end": lambda: time_lightly(images, args, device),
        "ssl_kit end to end": lambda: time_ssl_kit_pipeline(images, args, device),
        "ssl_kit compute-only": lambda: time_ssl_kit(args, device, **RECIPE),
        "plain loop compute-only": lambda: time_plain(args, device, **RECIPE),
        "channels_last": lambda: time_ssl_kit(args, device, channels_last=True, **RECIPE),
        "compile_backbone": lambda: time_ssl_kit(args, device, compile_backbone=True, **RECIPE),
        "fused_optimizer": lambda: time_ssl_kit(args, device, fused_optimizer=True, **RECIPE),
        "bf16-mixed": lambda: time_ssl_kit(variant(precision="bf16-mixed"), device, **RECIPE),
        "persistent_workers on, short epochs": lambda: time_ssl_kit_pipeline(images, args, device, args.epoch_steps),
        "persistent_workers off, short epochs": lambda: time_ssl_kit_pipeline(
            images, args, device, args.epoch_steps, persistent_workers=False
        ),
    }
    if device.type == "cuda":
        runs["16-mixed"] = lambda: time_ssl_kit(variant(precision="16-mixed"), device, **RECIPE)
        runs["pin_memory off"] = lambda: time_ssl_kit_pipeline(images, args, device, pin_memory=False)
    return {name: run for name, run in runs.items() if name.split(" ")[0] not in args.skip}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    # Enough steps for a steady state: the batches the workers prefetch before the timed window
    # (workers x prefetch_factor) would otherwise hide the loader's cost (6 timed steps: lightly at
    # 0.97 of compute-only; 24: 0.84).
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement and round")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps before them (worker start, compilation)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers, both pipelines")
    parser.add_argument("--epoch-steps", type=int, default=2, help="batches per epoch in the persistent_workers runs")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"], help="of every run but the precision options")
    parser.add_argument("--skip", nargs="*", default=[], help="measurements to leave out, by first word (e.g. compile_backbone)")
    parser.add_argument("--out", type=Path, help="report file (default: benchmarks/results/pipeline_speed_<device>.txt)")
    args = parser.parse_args()
    args.method, args.backbone = "BarlowTwins", "resnet18"
    device = torch.device(args.device)
    quiet()
    images = RandomImages((args.warmup + args.steps) * args.batch_size, args.image_size)  # one epoch per run
    start = time.perf_counter()

    runs = measurements(images, args, device)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(args.rounds):
        for name, run in runs.items():
            rates[name].append(run())
            print(f"round {round_index + 1}/{args.rounds}: {name} {rates[name][-1]:.1f} pairs/s", flush=True)
    memory = {side: measure_in_fresh_process(peak_memory, side, args, args.device) for side in ("ssl_kit", "plain")}
    flops = step_flops(args, device)
    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    peak = matmul_peak(device, dtype)
    report = format_report(args, device, rates, memory, flops, peak, dtype, (time.perf_counter() - start) / 60)
    out = args.out or RESULTS / f"pipeline_speed_{device.type}.txt"
    out.write_text(report)
    print(report, end="")
    print(f"written to {out}")


def format_report(args, device, rates, memory, flops, peak, dtype, minutes: float) -> str:
    def median(name: str) -> float:
        return statistics.median(rates[name])

    def ratio(a: str, b: str) -> tuple[float, str]:
        """Median of the per-round ratios, and the rounds."""
        per_round = [x / y for x, y in zip(rates[a], rates[b])]
        return statistics.median(per_round), ", ".join(f"{r:.3f}" for r in per_round)

    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "torchvision", "lightning", "pytorch_lightning", "lightly", "timm"))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    lines = [
        f"$ python {shlex.join(sys.argv)}",
        f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {where}, {torch.get_num_threads()} torch threads, {args.workers} loader workers; the run took {minutes:.1f} min",
        f"# {versions}",
        f"# Barlow Twins, ResNet-18 (standard stem), {args.image_size} px, batch {args.batch_size}, 2 views, {args.precision}; "
        f"{args.rounds} rounds of {args.warmup} untimed + {args.steps} timed steps per measurement; rates in pairs/s (median of rounds)",
        "",
    ]
    width = max(map(len, rates)) + 2
    for name, values in rates.items():
        lines.append(f"{name:<{width}}{median(name):8.1f}   rounds: {', '.join(f'{v:.1f}' for v in values)}")
    lines.append("")

    for a, b, target in (
        ("ssl_kit end to end", "lightly end to end", 1.5),
        ("ssl_kit end to end", "ssl_kit compute-only", 0.9),
        ("ssl_kit compute-only", "plain loop compute-only", 0.97),
    ):
        if a in rates and b in rates:
            value, rounds = ratio(a, b)
            verdict = "met" if value >= target else "NOT met"
            lines.append(f"{a} / {b}: {value:.3f}  (goal >= {target}: {verdict}; rounds: {rounds})")
    memory_line = f"peak memory growth, {args.warmup + args.steps} steps in a fresh process (MiB): " + "; ".join(
        f"{side} " + ", ".join(f"{kind} {value:.0f}" for kind, value in usage.items()) for side, usage in memory.items()
    )
    lines.append(memory_line)
    for kind in memory["ssl_kit"]:
        lines.append(f"  ssl_kit / plain peak {kind}: {memory['ssl_kit'][kind] / max(memory['plain'][kind], 1e-9):.3f} (goal <= 1.2)")
    lines.append("")
    per_pair = flops / args.batch_size
    lines.append(f"FLOPs per step (forward + backward, FlopCounterMode): {flops / 1e9:.1f} G ({per_pair / 1e6:.0f} M per pair)")
    lines.append(f"matrix-multiply peak ({dtype}, best square torch.mm): {peak / 1e9:.1f} GFLOP/s")
    for name in ("ssl_kit compute-only", "ssl_kit end to end", "lightly end to end"):  # the same FLOPs per pair
        if name in rates:
            achieved = per_pair * median(name)
            lines.append(f"  {name}: {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.1%} of the peak")
    lines.append("")
    lines.append("options (ratio of pairs/s; > 1 is faster; median of per-round ratios):")
    baselines = {"persistent_workers off, short epochs": "persistent_workers on, short epochs", "pin_memory off": "ssl_kit end to end"}
    for name in ("channels_last", "compile_backbone", "fused_optimizer", "bf16-mixed", "16-mixed", "persistent_workers off, short epochs", "pin_memory off"):
        base = baselines.get(name, "ssl_kit compute-only")
        if name in rates and base in rates:
            value, rounds = ratio(name, base)
            lines.append(f"  {name} / {base}: {value:.3f} (rounds: {rounds})")
    if device.type == "cpu":
        lines.append("  pin_memory: not measured (no GPU: ssl_kit pins only when CUDA is available)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
