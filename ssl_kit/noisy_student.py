"""``python -m ssl_kit.noisy_student --config CONFIG [--rounds N] [--teacher CKPT] [fit overrides]``

Noisy Student self-training (Xie et al. 2020), every round in one command. Each round a teacher
labels the unlabeled pool once, on clean images (eval mode); the pseudo-labels are filtered by
confidence and class-balanced (classes with too many keep their most confident samples, classes
with too few repeat theirs); then a student, equal or larger (``--student_backbones``), trains on
the labeled data plus the pseudo-labeled pool with noise: the strong views of ``WeakStrongViews``
and whatever dropout / stochastic depth the config gives (``--model.backbone_kwargs
'{"drop_rate": 0.3, "drop_path_rate": 0.1}'``). The student (its EMA, the module's ``forward``)
becomes the next round's teacher.

CONFIG is a ``MeanTeacher`` config with a semi-supervised DataModule (``labels_per_class`` or
``label_fraction``). Without ``--teacher``, round 0 trains that config as is (mean teacher) to
get the first teacher. Each round's run lives in ``<root>/round<N>``; the test accuracy of every
round's model is printed at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ssl_kit.cli import SSLCLI
from ssl_kit.semi.mean_teacher import MeanTeacher
from ssl_kit.semi.pseudo_labels import predict, select_pseudo_labels


def build(config: str, fit_args: list[str], root: Path, backbone: str | None) -> SSLCLI:
    args = ["--config", config, *fit_args, "--trainer.default_root_dir", str(root)]
    if backbone:
        args += ["--model.backbone", backbone]
    return SSLCLI(args=args, run=False)


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a MeanTeacher config with a semi-supervised DataModule")
    parser.add_argument("--rounds", type=int, default=1, help="student rounds (after round 0)")
    parser.add_argument("--teacher", help="checkpoint of the first teacher; without it round 0 trains CONFIG")
    parser.add_argument("--student_backbones", nargs="+", default=[], help="backbone per student round (cycled)")
    parser.add_argument("--threshold", type=float, default=0.7, help="confidence filter on the teacher's labels")
    parser.add_argument("--soft", action="store_true", help="soft targets (the teacher's probabilities) instead of hard")
    parser.add_argument("--no_balance", action="store_true", help="keep the teacher's class proportions")
    parser.add_argument("--root", default="runs/noisy_student", help="folder for the rounds' runs")
    args, fit_args = parser.parse_known_args(argv)
    root = Path(args.root)

    accuracies = []
    teacher_checkpoint = args.teacher
    if teacher_checkpoint is None:
        cli = build(args.config, fit_args, root / "round0", None)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        accuracies.append(evaluate_on_test(cli))
        teacher_checkpoint = last_checkpoint(cli)
    for round_index in range(1, args.rounds + 1):
        backbone = args.student_backbones[(round_index - 1) % len(args.student_backbones)] if args.student_backbones else None
        cli = build(args.config, fit_args, root / f"round{round_index}", backbone)
        data = cli.datamodule
        data.setup("fit")
        teacher = MeanTeacher.load_from_checkpoint(teacher_checkpoint, map_location="cpu")
        probs = predict(teacher, data.unlabeled_pool_dataloader())
        selected = select_pseudo_labels(probs, args.threshold, balance=not args.no_balance)
        if len(selected) == 0:
            raise RuntimeError(f"the teacher {teacher_checkpoint} is confident on no unlabeled sample at threshold {args.threshold}")
        targets = probs if args.soft else torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).float()
        data.set_pseudo_labels(targets, selected)
        print(f"round {round_index}: {len(np.unique(selected))} of {len(probs)} pool samples pseudo-labeled, {len(selected)} after balancing", flush=True)
        cli.trainer.fit(cli.model, datamodule=data)
        accuracies.append(evaluate_on_test(cli))
        teacher_checkpoint = last_checkpoint(cli)
    first = 0 if args.teacher is None else 1
    for index, accuracy in enumerate(accuracies, start=first):
        print(f"round {index}: test accuracy {accuracy:.4f}")
    return accuracies


def last_checkpoint(cli: SSLCLI) -> str:
    return str(Path(cli.trainer.default_root_dir) / "checkpoints" / "last.ckpt")


def evaluate_on_test(cli: SSLCLI) -> float:
    result = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return float(result[0]["test/acc"])


if __name__ == "__main__":
    main()
