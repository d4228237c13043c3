"""Few-label MNIST: does the unlabeled data help? Supervised-only, mean teacher, mean teacher from
an ssl_kit pretraining checkpoint, and one Noisy Student round, over several seeds.

Every variant runs the same config (``configs/mean_teacher_mnist.yaml``: 10 labels per class) for
the same number of optimizer steps; supervised-only is the same run with ``unlabeled_weight 0``
(so it sees the same labeled batches and steps). The Noisy Student round takes each seed's mean
teacher as its teacher. Test accuracy is the teacher's (the EMA model), after the last step: no
checkpoint is chosen on the test set. One SimCLR pretraining (same backbone and image size) serves
every seed's pretrained variant. Prints mean +- std over seeds. CPU-budget defaults: 28 px through
the standard ResNet stem, 3 unlabeled per labeled sample, threshold 0.8, EMA 0.99.

    python benchmarks/self_training.py --root ../shared/data/mnist --seeds 0 1 2 --steps 500
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ssl_kit.fit import main as fit
from ssl_kit.noisy_student import main as noisy_student

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mean_teacher_mnist.yaml")
PRETRAIN_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "simclr_mnist.yaml")


def test_accuracy(cli) -> float:
    return float(cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]["test/acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="MNIST idx files (e.g. ../shared/data/mnist)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per self-training run")
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=16, help="labeled batch")
    parser.add_argument("--unlabeled-ratio", type=int, default=3, help="unlabeled samples per labeled one (FixMatch: 7)")
    parser.add_argument("--threshold", type=float, default=0.8, help="pseudo-label confidence (FixMatch: 0.95)")
    parser.add_argument("--out", default="runs/bench_self_training")
    args = parser.parse_args()
    out = Path(args.out)
    common = [
        "--data.root", args.root, "--data.image_size", str(args.image_size), "--data.batch_size", str(args.batch_size),
        "--data.num_workers", "2", "--trainer.max_steps", str(args.steps), "--trainer.max_epochs", "-1",
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "auto",
        "--data.unlabeled_ratio", str(args.unlabeled_ratio), "--model.small_image", "false",
        "--model.threshold", str(args.threshold), "--model.ema_momentum", "0.99",
    ]  # fmt: skip

    started = time.time()
    pretrain = fit([
        "--config", PRETRAIN_CONFIG, "--data.root", args.root, "--data.image_size", str(args.image_size), "--model.small_image", "false",
        "--trainer.max_epochs", str(args.pretrain_epochs), "--trainer.default_root_dir", str(out / "pretrain"),
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false", "--data.num_workers", "2",
    ])  # fmt: skip
    checkpoint = str(out / "pretrain" / "checkpoints" / "last.ckpt")
    del pretrain

    results: dict[str, list[float]] = {}
    for seed in args.seeds:
        seeded = [*common, "--seed_everything", str(seed), "--data.seed", str(seed)]
        runs = {
            "supervised only (same steps)": [*seeded, "--model.unlabeled_weight", "0"],
            "mean teacher": seeded,
            "mean teacher from SimCLR checkpoint": [*seeded, "--model.init_from", checkpoint],
        }
        for name, extra in runs.items():
            root = out / f"seed{seed}" / name.split(" (")[0].replace(" ", "_")
            cli = fit(["--config", CONFIG, *extra, "--trainer.default_root_dir", str(root)])
            results.setdefault(name, []).append(test_accuracy(cli))
            print(f"seed {seed} {name}: {results[name][-1]:.4f}", flush=True)
        teacher = out / f"seed{seed}" / "mean_teacher" / "checkpoints" / "last.ckpt"
        student = noisy_student([
            "--config", CONFIG, "--teacher", str(teacher), "--rounds", "1", "--root", str(out / f"seed{seed}" / "noisy_student"),
            *seeded, "--model.backbone_kwargs", '{"drop_rate": 0.3}',
        ])  # fmt: skip
        results.setdefault("noisy student, 1 round (teacher: mean teacher)", []).append(student[-1])
        print(f"seed {seed} noisy student: {student[-1]:.4f}", flush=True)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nMNIST, 10 labels per class, {args.image_size} px, ResNet-18 (standard stem), {args.steps} steps per run, "
          f"labeled batch {args.batch_size} + {args.unlabeled_ratio * args.batch_size} unlabeled, threshold {args.threshold}, "
          f"SimCLR pretraining {args.pretrain_epochs} epochs, seeds {args.seeds}, {device}, "
          f"{(time.time() - started) / 60:.0f} min in all")  # fmt: skip
    print(f"{'variant':<50} test accuracy (mean +- std)")
    for name, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:<50} {statistics.mean(values):.4f} +- {spread:.4f}   ({', '.join(f'{v:.4f}' for v in values)})")


if __name__ == "__main__":
    main()
