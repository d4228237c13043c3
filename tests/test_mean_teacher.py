"""Mean-teacher self-training: few-label splits, the pseudo-label and doubly robust losses against
their formulas, a teacher that gets no gradients, an unlabeled loss that really trains the student
(USB's always-zero consistency loss must be impossible), the pretrain -> self-train pipeline, and
learning: with the unlabeled pool the teacher beats the same model trained on the labels alone."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import fit
from ssl_kit.data import DigitsDataModule
from ssl_kit.data.splits import few_label_split
from ssl_kit.losses.self_training import DoublyRobustLoss, ThresholdedPseudoLabelLoss, pseudo_labels, soft_cross_entropy
from ssl_kit.methods import MeanTeacher
from ssl_kit.methods.mean_teacher import rampup
from ssl_kit.transforms import WeakStrongViews


# --------------------------------------------------------------------------------------------
# few-label splits
# --------------------------------------------------------------------------------------------
LABELS = np.repeat(np.arange(5), [30, 12, 50, 7, 21])


def test_few_label_split_exact_counts_seeded_and_disjoint():
    labeled, unlabeled = few_label_split(LABELS, labels_per_class=4, seed=3)
    assert np.bincount(LABELS[labeled]).tolist() == [4] * 5
    assert np.intersect1d(labeled, unlabeled).size == 0
    assert np.array_equal(np.sort(np.concatenate([labeled, unlabeled])), np.arange(len(LABELS)))
    again, _ = few_label_split(LABELS, labels_per_class=4, seed=3)
    other, _ = few_label_split(LABELS, labels_per_class=4, seed=4)
    assert np.array_equal(labeled, again) and not np.array_equal(labeled, other)


def test_few_label_split_by_fraction_and_errors():
    labeled, _ = few_label_split(LABELS, fraction=0.1, seed=0)
    assert np.bincount(LABELS[labeled]).tolist() == [3, 1, 5, 1, 2]  # round(0.1 * n_c), at least 1
    with pytest.raises(ValueError, match="class 3 has 7"):
        few_label_split(LABELS, labels_per_class=8)
    with pytest.raises(ValueError, match="exactly one"):
        few_label_split(LABELS, labels_per_class=2, fraction=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        few_label_split(LABELS)


def semi_digits(**kwargs) -> DigitsDataModule:
    options = dict(image_size=8, batch_size=4, unlabeled_ratio=3, labels_per_class=2, num_workers=0, views=WeakStrongViews(flip_prob=0.0))
    data = DigitsDataModule(**{**options, **kwargs})
    data.setup("fit")
    return data


def test_semi_supervised_loaders_labeled_and_unlabeled_batches():
    data = semi_digits()
    train_labels = np.asarray(data.splits.train.labels)
    assert np.bincount(train_labels[data.labeled_indices]).tolist() == [2] * 10
    assert len(data.unlabeled_indices) == len(train_labels) - 20
    loader = data.train_dataloader()
    batch, _, _ = next(iter(loader))
    (labeled_views, labels), (unlabeled_views, hidden) = batch["labeled"], batch["unlabeled"]
    assert [v.shape for v in labeled_views] == [(4, 3, 8, 8)] * 2 and labels.shape == (4,)
    assert [v.shape for v in unlabeled_views] == [(12, 3, 8, 8)] * 2 and (hidden >= 0).all()
    # an epoch is one pass over the unlabeled pool; the small labeled set is cycled
    assert len(loader) == len(data.unlabeled_indices) // 12
    bank, _ = data.val_dataloader()
    assert len(bank.dataset) == 20  # the kNN bank holds the labeled samples only


def test_weak_and_strong_views_differ_only_by_the_strong_augmentation():
    views = WeakStrongViews(flip_prob=0.0, translate=0.0, cutout=0.5)
    views.configure(16, (0.5,) * 3, (0.5,) * 3)
    from PIL import Image

    image = Image.fromarray((np.arange(256).reshape(16, 16) % 251).astype(np.uint8)).convert("RGB")
    torch.manual_seed(0)
    weak, strong = views(image)
    assert torch.equal(weak, views.weak(image))  # no translation: the weak view is the image
    assert weak.shape == strong.shape == (3, 16, 16) and not torch.equal(weak, strong)


# --------------------------------------------------------------------------------------------
# losses against their formulas
# --------------------------------------------------------------------------------------------
def test_pseudo_labels_threshold_masking_counts_and_soft_targets():
    logits = torch.tensor([[4.0, 0.0, 0.0], [1.0, 1.2, 0.0], [0.0, 0.0, 9.0], [2.0, 2.0, 2.0]])
    probs = logits.softmax(1)
    labels = pseudo_labels(logits, threshold=0.97)  # row 0: 0.965
    assert labels.mask.tolist() == (probs.max(1).values >= 0.97).tolist() == [False, False, True, False]
    labels = pseudo_labels(logits, threshold=0.5)
    assert labels.mask.tolist() == [True, False, True, False]
    assert torch.equal(labels.targets, F.one_hot(logits.argmax(1), 3).float())
    soft = pseudo_labels(logits, threshold=0.0, soft=True, temperature=0.5)
    assert torch.allclose(soft.targets, (logits / 0.5).softmax(1)) and soft.mask.all()


def test_thresholded_loss_is_the_masked_mean_over_all_unlabeled_rows():
    student = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    teacher = torch.tensor([[5.0, 0, 0, 0], [0, 0.1, 0, 0], [0, 0, 6.0, 0], [0, 0, 0, 0.2], [7.0, 0, 0, 0], [0, 0, 0, 0]])
    labels = pseudo_labels(teacher, threshold=0.95)
    expected = sum(-F.log_softmax(student[i], 0)[teacher[i].argmax()] for i in range(6) if teacher[i].softmax(0).max() >= 0.95) / 6
    assert ThresholdedPseudoLabelLoss()(student, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert labels.mask.sum() == 3


def test_doubly_robust_equals_labeled_only_loss_when_pseudo_labels_are_uninformative():
    """Pseudo-labels drawn independently of the data (uniform over classes): in expectation the two
    pseudo-label terms cancel and the loss is the labeled-only cross-entropy."""
    gen = torch.Generator().manual_seed(0)
    n, m, classes = 5, 15, 4
    labeled_logits, labels = torch.randn(n, classes, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    unlabeled_logits = labeled_logits.repeat(3, 1)  # the unlabeled samples follow the labeled distribution
    labeled_only = F.cross_entropy(labeled_logits, labels).item()
    loss = DoublyRobustLoss()
    # exact expectation: the expected one-hot of a uniform label is the uniform distribution
    uniform = torch.full((n + m, classes), 1 / classes)
    assert loss(labeled_logits, labels, uniform[:n], unlabeled_logits, uniform[n:]).item() == pytest.approx(labeled_only, rel=1e-6)
    # and by sampling random hard pseudo-labels
    draws = [
        loss(labeled_logits, labels, F.one_hot(torch.randint(0, classes, (n,), generator=gen), classes).float(),
             unlabeled_logits, F.one_hot(torch.randint(0, classes, (m,), generator=gen), classes).float()).item()
        for _ in range(1000)
    ]  # fmt: skip
    assert np.mean(draws) == pytest.approx(labeled_only, abs=0.05)  # seeded: about 2 standard errors
    assert np.std(draws) > 0.1  # single draws do differ: only the expectation is labeled-only


def test_doubly_robust_equals_all_data_loss_when_pseudo_labels_are_true():
    gen = torch.Generator().manual_seed(1)
    n, m, classes = 4, 10, 3
    logits, labels = torch.randn(n + m, classes, generator=gen), torch.randint(0, classes, (n + m,), generator=gen)
    onehot = F.one_hot(labels, classes).float()
    got = DoublyRobustLoss()(logits[:n], labels[:n], onehot[:n], logits[n:], onehot[n:])
    assert got.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    # the ramp: weight 0 is labeled-only training
    got = DoublyRobustLoss()(logits[:n], labels[:n], onehot[:n], logits[n:], onehot[n:], weight=0.0)
    assert got.item() == pytest.approx(F.cross_entropy(logits[:n], labels[:n]).item(), rel=1e-6)


def test_soft_cross_entropy_and_rampup():
    logits, targets = torch.randn(3, 5), torch.rand(3, 5).softmax(1)
    expected = torch.stack([-(targets[i] * logits[i].log_softmax(0)).sum() for i in range(3)])
    assert torch.allclose(soft_cross_entropy(logits, targets), expected)
    assert rampup(0.0, 0.4) == pytest.approx(math.exp(-5)) and rampup(0.2, 0.4) == pytest.approx(math.exp(-1.25))
    assert rampup(0.4, 0.4) == rampup(0.9, 0.4) == rampup(0.0, 0.0) == 1.0


# --------------------------------------------------------------------------------------------
# the module: gradients, teacher, the unlabeled loss
# --------------------------------------------------------------------------------------------
class FakeTrainer:
    """What the module reads from its trainer outside a fit: step counts."""

    estimated_stepping_batches = 10
    max_epochs = 1
    global_step = 0


def tiny_teacher(**kwargs) -> MeanTeacher:
    model = MeanTeacher(**{"backbone": "resnet18", "image_size": 8, "num_classes": 10, "threshold": 0.0, **kwargs})
    model._trainer = FakeTrainer()
    return model.train()


def semi_batch():
    data = semi_digits()
    batch, _, _ = next(iter(data.train_dataloader()))
    return batch


@pytest.mark.parametrize("loss", ["fixmatch", "doubly_robust"])
def test_unlabeled_loss_is_nonzero_and_alone_trains_the_student_not_the_teacher(loss):
    """USB's Mean Teacher compared a tensor with itself (always 0). Here the unlabeled loss alone is
    non-zero, gives the student gradients, and an optimizer step on it changes the student."""
    torch.manual_seed(0)
    model = tiny_teacher(loss=loss)
    batch = semi_batch()
    _, unlabeled_loss, pseudo = model.loss_terms(batch)
    assert unlabeled_loss.abs() > 1e-3 and pseudo.mask.all()  # threshold 0: every pseudo-label counts
    unlabeled_loss.backward()
    assert model.head.weight.grad.abs().sum() > 0
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    teacher = [*model.teacher_backbone.parameters(), *model.teacher_head.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in teacher)
    before = model.head.weight.detach().clone()
    torch.optim.SGD(model.trained_modules()[1].parameters(), lr=0.1).step()
    assert not torch.equal(model.head.weight, before)


def test_teacher_is_in_no_optimizer_group_and_follows_the_running_average():
    model = tiny_teacher()
    optimizer = model.configure_optimizers()["optimizer"]
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_groups == {id(p) for p in [*model.backbone.parameters(), *model.head.parameters()]}
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    # momenta 0, 1/2, 2/3 (min(1 - 1/(t+1), ema_momentum)): the teacher is the mean of the three students
    snapshots = []
    for step in range(1, 4):
        with torch.no_grad():
            model.head.weight.add_(torch.randn_like(model.head.weight))
        snapshots.append(model.head.weight.detach().clone())
        model.ema.step(step, 10)
    assert torch.allclose(model.teacher_head.weight, torch.stack(snapshots).mean(0), atol=1e-6)


def test_teacher_predicts_in_eval_mode():
    model = tiny_teacher(backbone_kwargs={"drop_rate": 0.5})
    assert model.backbone.training and not model.teacher_backbone.training and not model.teacher_head.training
    images = torch.randn(4, 3, 8, 8)
    assert torch.equal(model(images), model(images))  # no dropout, running BatchNorm statistics


def test_mean_teacher_needs_a_semi_supervised_datamodule():
    with pytest.raises(TypeError, match="labels_per_class"):
        tiny_teacher().loss_terms(([torch.randn(2, 3, 8, 8)] * 2, torch.zeros(2, dtype=torch.long)))


# --------------------------------------------------------------------------------------------
# the pipeline through the CLI: pretrain -> self-train
# --------------------------------------------------------------------------------------------
def test_pretrain_then_self_train_from_the_checkpoint(tmp_path):
    from ssl_kit.export import backbone_from_checkpoint

    pretrain = fit("simclr_digits.yaml", tmp_path / "simclr", "--trainer.max_epochs", "1")
    checkpoint = tmp_path / "simclr" / "checkpoints" / "last.ckpt"
    state, _ = backbone_from_checkpoint(checkpoint)
    cli = fit(
        "mean_teacher_digits.yaml", tmp_path / "mt", "--trainer.max_epochs", "1", "--data.batch_size", "4",
        "--model.init_from", str(checkpoint), "--trainer.max_steps", "0",
    )  # fmt: skip
    for name, value in state.items():
        assert torch.equal(cli.model.backbone.state_dict()[name], value), name
        assert torch.equal(cli.model.teacher_backbone.state_dict()[name], value), name
    del pretrain


def test_init_from_a_different_architecture_names_the_file(tmp_path):
    fit("simclr_digits.yaml", tmp_path / "simclr", "--trainer.max_epochs", "1")
    checkpoint = tmp_path / "simclr" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="last.ckpt.*does not fit"):
        MeanTeacher(backbone="resnet34", image_size=8, init_from=str(checkpoint))
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        MeanTeacher(backbone="resnet18", image_size=8, init_from=str(tmp_path / "nothing.ckpt"))


def test_cli_run_logs_mask_rate_and_pseudo_label_accuracy_saves_the_split_and_tests_the_teacher(tmp_path):
    cli = fit("mean_teacher_digits.yaml", tmp_path, "--trainer.max_epochs", "2", "--data.batch_size", "4", "--model.threshold", "0.5")
    metrics = cli.trainer.callback_metrics
    for key in ("train/unlabeled_loss", "train/mask_rate", "train/supervised_loss", "val/teacher_acc", "val/student_acc"):
        assert key in metrics, key
    assert cli.model.ema.last_step == cli.trainer.global_step == 4
    split = json.loads((tmp_path / "csv" / "version_0" / "few_label_split.json").read_text())
    assert split["labels_per_class"] == 5 and split["labeled_per_class"] == {str(c): 5 for c in range(10)}
    assert split["labeled_indices"] == cli.datamodule.labeled_indices.tolist()
    result = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert 0.0 <= result[0]["test/acc"] <= 1.0


# --------------------------------------------------------------------------------------------
# Noisy Student: pool labeling, filtering, balancing
# --------------------------------------------------------------------------------------------
def test_select_pseudo_labels_filters_by_confidence_and_balances_classes():
    from ssl_kit.noisy_student import select_pseudo_labels

    # class 0: confidences .9 .8 .6 ; class 1: .95 ; class 2: .5 (below the threshold)
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.02, 0.95, 0.03], [0.25, 0.25, 0.5]])
    assert select_pseudo_labels(probs, 0.55, balance=False).tolist() == [0, 1, 2, 3]
    # balanced to the largest kept class: class 1's single sample is repeated 3 times
    assert select_pseudo_labels(probs, 0.55).tolist() == [0, 1, 2, 3, 3, 3]
    # a fixed quota keeps the most confident of a large class
    assert select_pseudo_labels(probs, 0.55, per_class=2).tolist() == [0, 1, 3, 3]
    assert select_pseudo_labels(probs, 0.99).tolist() == []


def test_pre_labeled_pool_trains_the_student_on_the_given_targets():
    data = semi_digits()
    pool = len(data.unlabeled_indices)
    targets = F.one_hot(torch.arange(pool) % 10, 10).float()
    data.set_pseudo_labels(targets, np.arange(0, pool, 2))
    batch, _, _ = next(iter(data.train_dataloader()))
    views, hidden, given = batch["unlabeled"]
    assert given.shape == (12, 10) and hidden.shape == (12,)
    model = tiny_teacher(threshold=0.99).eval()  # eval: BatchNorm does not depend on the batch's composition
    _, unlabeled_loss, pseudo = model.loss_terms(batch)  # the threshold does not re-filter a pre-labeled pool
    assert pseudo.mask.all() and torch.equal(pseudo.targets, given)
    student = model.student(views[1])
    assert unlabeled_loss.item() == pytest.approx(soft_cross_entropy(student, given).mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="pool of"):
        data.set_pseudo_labels(targets[:-1], np.arange(3))


# --------------------------------------------------------------------------------------------
# learning: the unlabeled pool helps
# --------------------------------------------------------------------------------------------
# 5 labels per class, 10 epochs over the unlabeled pool (220 optimizer steps), at 24 px through
# the standard ResNet stem (6x6 maps after it: 4x cheaper than the CIFAR stem at 16 px, and the
# measured gain is the same); the baseline is the same run with unlabeled_weight 0: same labeled
# batches, same steps. Measured: teacher 0.923 with the pool, 0.763 on the labels alone.
LEARN = [
    "--trainer.max_epochs", "10", "--trainer.limit_train_batches", "1.0", "--trainer.limit_val_batches", "1.0",
    "--trainer.check_val_every_n_epoch", "10", "--trainer.num_sanity_val_steps", "0",
    "--data.image_size", "24", "--model.small_image", "false", "--data.batch_size", "16", "--model.ema_momentum", "0.9",
]  # fmt: skip


def test_mean_teacher_beats_the_same_model_trained_on_the_labels_alone(tmp_path):
    mean_teacher = fit("mean_teacher_digits.yaml", tmp_path / "mt", *LEARN)
    labels_only = fit("mean_teacher_digits.yaml", tmp_path / "sup", *LEARN, "--model.unlabeled_weight", "0")
    assert mean_teacher.trainer.global_step == labels_only.trainer.global_step > 100
    with_pool = mean_teacher.trainer.callback_metrics["val/teacher_acc"].item()
    without = labels_only.trainer.callback_metrics["val/teacher_acc"].item()
    print(f"mean teacher {with_pool:.3f} vs labels only {without:.3f}")
    assert with_pool >= without + 0.04
    assert mean_teacher.trainer.callback_metrics["train/mask_rate"] > 0.3  # the pool was really used


def test_noisy_student_command_runs_every_round_with_a_larger_noised_student(tmp_path, capsys):
    from conftest import REPO, TINY
    from ssl_kit.noisy_student import main as noisy_student

    accuracies = noisy_student([
        "--config", str(REPO / "configs" / "mean_teacher_digits.yaml"), "--rounds", "1", "--root", str(tmp_path),
        "--student_backbones", "resnet34", "--threshold", "0.0", *TINY, "--data.batch_size", "4",
        "--trainer.max_epochs", "1", "--model.backbone_kwargs", '{"drop_rate": 0.3}',
    ])  # fmt: skip
    assert len(accuracies) == 2 and all(0.0 <= a <= 1.0 for a in accuracies)
    out = capsys.readouterr().out
    assert "round 1:" in out and "pool samples pseudo-labeled" in out
    assert (tmp_path / "round1" / "csv" / "version_0" / "few_label_split.json").is_file()  # set up before the fit
    student = MeanTeacher.load_from_checkpoint(tmp_path / "round1" / "checkpoints" / "last.ckpt")
    teacher = MeanTeacher.load_from_checkpoint(tmp_path / "round0" / "checkpoints" / "last.ckpt")
    assert student.hparams.backbone == "resnet34" and teacher.hparams.backbone == "resnet18"
    assert student.hparams.backbone_kwargs == {"drop_rate": 0.3} and student.backbone.drop_rate == 0.3


def test_export_of_a_self_training_checkpoint_is_the_teacher(tmp_path):
    from ssl_kit.export import backbone_from_checkpoint

    cli = fit("mean_teacher_digits.yaml", tmp_path, "--trainer.max_epochs", "1", "--data.batch_size", "4")
    state, _ = backbone_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    teacher = cli.model.teacher_backbone.state_dict()
    assert state.keys() == teacher.keys() and all(torch.equal(state[k], teacher[k]) for k in state)
    assert not all(torch.equal(state[k], cli.model.backbone.state_dict()[k]) for k in state)  # not the student
