"""Why MSN's frozen features can fall below random init after a short run: collapse diagnostics.

For an MSN checkpoint and the same network at random init (same hyper-parameters, seed 0): kNN
(k 20, T 0.07) of the online and the target encoder, the effective rank of the features (exp of
the entropy of the normalised singular values), their mean pairwise cosine, and how the anchor
predictions use the prototypes (argmax count, entropy of the mean prediction, mean max
probability: near 1/K means near-uniform predictions, where ME-MAX is met trivially and the
sharpened targets carry little signal).

    python benchmarks/msn_collapse.py --checkpoint runs/bench/leaderboard_cpu/<MSN MNIST cell>/checkpoints/last.ckpt \
        --root ../shared/data/mnist --out benchmarks/results/msn_collapse_mnist.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from ssl_kit.data import MNISTDataModule
from ssl_kit.evaluation import extract, knn
from ssl_kit.methods.msn import MSN


def effective_rank(features: torch.Tensor) -> float:
    singular = torch.linalg.svdvals(features - features.mean(0))
    share = singular / singular.sum()
    return float(torch.exp(-(share * share.clamp_min(1e-12).log()).sum()))


def mean_cosine(features: torch.Tensor) -> float:
    unit = F.normalize(features, dim=1)
    n = len(unit)
    return float(((unit @ unit.T).sum() - n) / (n * n - n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--root", default="../shared/data/mnist")
    parser.add_argument("--out")
    args = parser.parse_args()
    trained = MSN.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    torch.manual_seed(0)
    random = MSN(**{k: v for k, v in trained.hparams.items() if not k.startswith("_")}).eval()
    data = MNISTDataModule(root=args.root, image_size=trained.input_spec.side, num_workers=0, batch_size=500, train_subset=5000, eval_subset=1000)
    data.setup()
    lines = [f"# {args.checkpoint}: MNIST, bank 5,000 train digits, 1,000 test digits", ""]
    for name, network in (("random init", random.backbone), ("MSN online", trained.backbone), ("MSN target", trained.target_backbone)):
        bank, test = extract(network, data.labeled_dataloader("train")), extract(network, data.labeled_dataloader("test"))
        queries = test.features
        accuracy = knn(bank, test, 10, 20, 0.07)
        lines.append(f"{name:12s} kNN {accuracy:.3f}  effective rank {effective_rank(queries):5.1f} of {queries.shape[1]}  mean cosine {mean_cosine(queries):.3f}")
    queries = extract(trained.backbone, data.labeled_dataloader("test")).features
    with torch.no_grad():
        anchors = F.normalize(trained.projector(queries), dim=1)
        probs = F.softmax(anchors @ F.normalize(trained.prototypes.weight, dim=1).T / trained.hparams.temperature, dim=1)
    mean = probs.mean(0)
    count = probs.shape[1]
    lines.append(
        f"prototypes: {probs.argmax(1).unique().numel()} of {count} used as argmax; entropy of the mean prediction "
        f"{float(-(mean * mean.clamp_min(1e-12).log()).sum()):.2f} (uniform {torch.log(torch.tensor(float(count))):.2f}); "
        f"mean max probability {float(probs.max(1).values.mean()):.4f} (uniform {1 / count:.4f})"
    )
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
