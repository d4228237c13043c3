"""Pretraining-step throughput: ssl_kit (Lightning Trainer) against a plain PyTorch loop.

Both sides compute the same method loss (``model.training_loss``: backbone, heads, masking,
momentum targets) with the same optimizer on the same in-memory random views and batch size,
and the plain loop steps the method's EMA target (MoCo v3, MSN) once per step as the Trainer
does; rounds alternate (ssl_kit, plain, ssl_kit, ...) so that machine drift hits both. Prints
samples/s of each and the ratio ssl_kit / plain (target >= 0.97). ssl_kit's step also trains
its online probe and checks the loss is finite.

    python benchmarks/throughput.py --method SimCLR --backbone resnet18 --image-size 32 --batch-size 64
    python benchmarks/throughput.py --method MAE --backbone vit_tiny_patch16_224 --image-size 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ssl_kit import methods
from ssl_kit.inputs import InputSpec


class FixedViews(Dataset):
    """``batches`` pre-made batches of two random views; the loader adds no decoding cost."""

    def __init__(self, steps: int, batch_size: int, image_size: int, num_classes: int = 10) -> None:
        generator = torch.Generator().manual_seed(0)
        self.views = torch.randn(2, batch_size, 3, image_size, image_size, generator=generator)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int):
        return [self.views[0], self.views[1]], self.labels


def loader(steps: int, args) -> DataLoader:
    # batch_size=None: each item already is a whole batch.
    return DataLoader(FixedViews(steps, args.batch_size, args.image_size), batch_size=None, shuffle=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepTiming:
    """Wall time from the start of batch ``warmup`` (counted across epochs) to the end of the last
    batch. A mixin, so that both ``lightning``'s and ``pytorch_lightning``'s Trainers (lightly's
    examples use the latter) take it as a callback."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.batches = 0
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.batches == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        sync(self.device)
        self.end = time.perf_counter()

    def rate(self, batch_size: int) -> float:
        """Samples per second over the timed batches."""
        return (self.batches - self.warmup) * batch_size / (self.end - self.start)


class StepTimer(StepTiming, L.Callback):
    pass


def make_model(args, **options) -> methods.SSLMethod:
    """``args.method`` with SGD and no warmup; ``options``: further constructor arguments."""
    L.seed_everything(0, verbose=False)
    method = getattr(methods, args.method)
    return method(backbone=args.backbone, input_spec=InputSpec.image(args.image_size), num_classes=10, optimizer="sgd", warmup_epochs=0, **options)


def trainer_options(args, device: torch.device) -> dict:
    """A Trainer that runs ``args.warmup + args.steps`` training steps and nothing else."""
    return dict(
        accelerator=device.type, devices=1, max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        precision=args.precision,
    )  # fmt: skip


def timed_fit(model: L.LightningModule, args, device: torch.device, epoch_steps: int | None = None, **fit_inputs) -> float:
    """Samples/s of ``model``'s training step in ssl_kit's Trainer; ``fit_inputs``: the loader or
    DataModule; ``epoch_steps``: epochs of that many batches (default: the loader's length)."""
    timer = StepTimer(args.warmup, device)
    trainer = L.Trainer(callbacks=[timer], limit_train_batches=epoch_steps, **trainer_options(args, device))
    trainer.fit(model, **fit_inputs)
    return timer.rate(args.batch_size)


def time_ssl_kit(args, device: torch.device, **options) -> float:
    return timed_fit(make_model(args, **options), args, device, train_dataloaders=loader(args.warmup + args.steps, args))


def time_plain(args, device: torch.device, **options) -> float:
    """The textbook loop: the method's loss on both views, backward, SGD step (the model's
    settings), schedule step, EMA."""
    model = make_model(args, **options).to(device).train()
    hp = model.hparams
    params = [p for module in model.trained_modules() for p in module.parameters() if p.requires_grad]
    ema = getattr(model, "ema", None)
    total = args.warmup + args.steps
    optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    start = 0.0
    for step, (views, _) in enumerate(loader(args.warmup + args.steps, args)):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        with autocast:
            loss, _ = model.training_loss([v.to(device, non_blocking=True) for v in views])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.step(step + 1, total)
    sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pretraining = [name for name in methods.__all__ if name != "SSLMethod" and issubclass(getattr(methods, name), methods.SSLMethod)]
    parser.add_argument("--method", default="SimCLR", choices=pretraining)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ours, plain = [], []
    for _ in range(args.rounds):
        ours.append(time_ssl_kit(args, device))
        plain.append(time_plain(args, device))
    ratios = [a / b for a, b in zip(ours, plain)]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.method} {args.backbone} {args.image_size}px batch {args.batch_size} {args.precision} on {where}")
    print(f"ssl_kit samples/s per round: {', '.join(f'{x:.1f}' for x in ours)}")
    print(f"plain   samples/s per round: {', '.join(f'{x:.1f}' for x in plain)}")
    print(f"ratio ssl_kit / plain: median {statistics.median(ratios):.3f} (rounds: {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"ratio of best rounds: {max(ours) / max(plain):.3f}")


if __name__ == "__main__":
    main()
