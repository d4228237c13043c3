"""Linear-probe speed: the cached-feature probe against the classic augmented probe, side by side,
on the same frozen backbone and data.

* cached (``ssl_kit.evaluation``): the backbone runs once over the un-augmented train, val and
  test splits (``extract``); then ``linear_probe`` trains every lr x weight-decay setting of its
  default sweep on the cached features and keeps the one with the best validation accuracy. Its
  time includes the extraction and the whole sweep.
* classic (solo-learn's linear evaluation): every epoch the frozen backbone (eval mode) runs on
  freshly augmented training images (random-resized crop + horizontal flip); one setting (SGD,
  momentum 0.9, cosine, ``--baseline-lr``, no weight decay), no sweep. Its time includes the
  forward pass over the test set.

Both heads are ``BatchNorm1d(affine=False)`` + linear (MAE's probe), trained for ``--epochs`` with
batch ``--batch-size``; both report test top-1 of the final head. Also printed: the cached probe
restricted to the classic probe's single setting, which separates augmentation from the sweep.

    python -m ssl_kit.fit --config configs/simclr_digits.yaml --trainer.max_epochs 5 \\
        --trainer.default_root_dir runs/bench_linear_probe/simclr_digits
    python benchmarks/linear_probe_speed.py --checkpoint runs/bench_linear_probe/simclr_digits/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from ssl_kit.evaluation import PROBE_LRS, PROBE_WEIGHT_DECAYS, extract, linear_probe, top1
from ssl_kit.data.base import SSLDataModule
from ssl_kit.data.datasets import Transformed
from ssl_kit.data.image import DigitsDataModule, MNISTDataModule
from ssl_kit.checkpoints import read_checkpoint, saved_input_spec
from ssl_kit.models import backbone_from_checkpoint
from ssl_kit.models.backbones import build_from_spec
from ssl_kit.optim import warmup_cosine


def classic_probe(
    backbone: nn.Module, data: SSLDataModule, epochs: int, lr: float, crop_scale: tuple[float, float]
) -> tuple[float, float]:
    """Test top-1 and wall time of the classic probe (see the module doc); plain PyTorch loop, so
    no framework overhead is charged to it."""
    start = time.perf_counter()
    augment = T.Compose([
        T.RandomResizedCrop(data.input_spec.side, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(data.mean, data.std),
    ])  # fmt: skip
    loader = data.loader(Transformed(data.splits.train, augment), shuffle=True)
    head = nn.Sequential(nn.BatchNorm1d(backbone.num_features, affine=False), nn.Linear(backbone.num_features, data.num_classes))
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    total = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, 0, total))
    backbone.eval()
    for _ in range(epochs):
        for images, labels in loader:
            with torch.no_grad():
                features = backbone(images)
            loss = F.cross_entropy(head(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    test = extract(backbone, data.labeled_dataloader("test"))
    with torch.no_grad():
        accuracy = top1(head.eval()(test.features), test.labels)
    return accuracy, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="ssl_kit pretraining checkpoint (.ckpt); its image size is used")
    parser.add_argument("--mnist-root", help="MNIST idx files (e.g. ../shared/data/mnist) instead of the embedded digits")
    parser.add_argument("--epochs", type=int, default=100, help="for both probes")
    parser.add_argument("--batch-size", type=int, default=256, help="for both probes")
    parser.add_argument("--baseline-lr", type=float, default=0.1)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), help="classic probe's random-resized crop")
    parser.add_argument("--workers", type=int, default=2, help="loader workers, for both probes")
    parser.add_argument("--threads", type=int, help="torch intra-op threads, for both probes (default: torch's)")
    parser.add_argument("--note", default="", help="printed with the header (e.g. what else ran on the machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the classic probe's augmentation, shuffling and head init

    state, spec = backbone_from_checkpoint(args.checkpoint)
    backbone = build_from_spec(spec)
    backbone.load_state_dict(state)
    image_size = saved_input_spec(read_checkpoint(args.checkpoint)["hyper_parameters"]).side
    common = {"image_size": image_size, "batch_size": args.batch_size, "num_workers": args.workers, "pin_memory": False}
    data = MNISTDataModule(args.mnist_root, download=False, **common) if args.mnist_root else DigitsDataModule(**common)
    data.setup()
    print(f"# {datetime.date.today()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average at start {os.getloadavg()[0]:.1f}")  # fmt: skip
    if args.note:
        print(f"# {args.note}")
    print(f"{type(data).__name__} at {image_size} px (train {len(data.splits.train)}, val {len(data.splits.val)}, "
          f"test {len(data.splits.test)}), backbone {spec.name} from {args.checkpoint}, {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.workers} loader workers")  # fmt: skip

    start = time.perf_counter()
    train, val, test = (extract(backbone, data.labeled_dataloader(split)) for split in ("train", "val", "test"))
    extraction = time.perf_counter() - start
    swept = linear_probe(train, val, test, data.num_classes, epochs=args.epochs, batch_size=args.batch_size)
    single = linear_probe(
        train, val, test, data.num_classes, epochs=args.epochs, batch_size=args.batch_size, lrs=(args.baseline_lr,), weight_decays=(0.0,)
    )
    cached = extraction + swept.wall_time_s
    sweep = f"{len(PROBE_LRS)} lrs x {len(PROBE_WEIGHT_DECAYS)} weight decays"
    print(f"cached probe: extraction {extraction:.1f} s + sweep of {sweep} {swept.wall_time_s:.1f} s = {cached:.1f} s; "
          f"chose {swept.chosen} (val {swept.val_top1:.4f}); test top-1 {swept.test_top1:.4f}")  # fmt: skip
    print(f"cached probe, the classic probe's single setting (lr {args.baseline_lr}, wd 0): {single.wall_time_s:.2f} s "
          f"(+ extraction); test top-1 {single.test_top1:.4f}")  # fmt: skip

    accuracy, seconds = classic_probe(backbone, data, args.epochs, args.baseline_lr, tuple(args.crop_scale))
    print(f"classic probe (augmented images every epoch, crop scale {tuple(args.crop_scale)} + flip, lr {args.baseline_lr}, "
          f"one setting): {seconds:.1f} s ({seconds / args.epochs:.2f} s/epoch); test top-1 {accuracy:.4f}")  # fmt: skip
    print(f"time ratio classic / cached: {seconds / cached:.1f}x (goal >= 20x); "
          f"test top-1 cached - classic: {swept.test_top1 - accuracy:+.4f} (goal >= 0)")  # fmt: skip
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
