"""Checks of the SSL losses against explicit formulas (and, for Mixed Barlow Twins, under 2-rank DDP).

* NT-Xent: lightly's ``NTXentLoss(temperature, gather_distributed=True)``, exactly as
  ``ssl_kit.methods.simclr.SimCLR`` builds it, against a loop over the 2N anchors of the
  SimCLR formula, plus a hand-computed limit case.
* Barlow Twins: ``ssl_kit.losses.BarlowTwinsLoss`` against a numpy implementation of the
  paper's formula, a perfectly-correlated / decorrelated input (loss ~ 0), and its relation to
  lightly's ``BarlowTwinsLoss``.
* Mixed Barlow Twins: the regulariser against the paper's target matrices written out, weight 0
  equal to plain Barlow Twins exactly, the method's mixup of the views, 2-rank DDP equal to one
  process on the concatenated batch, and a CLI run.

``ssl_kit.losses.BarlowTwinsLoss`` computes in float32 (it calls ``.float()`` so that
fp16/bf16 projector outputs are standardised in full precision); float64 inputs are therefore
compared with float32 tolerances.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightly.loss import BarlowTwinsLoss as LightlyBarlowTwinsLoss
from lightly.loss import NTXentLoss

from ssl_kit.inputs import InputSpec
from ssl_kit.losses import BarlowTwinsLoss


# --------------------------------------------------------------------------------------------
# NT-Xent
# --------------------------------------------------------------------------------------------
def ntxent_reference(out0: np.ndarray, out1: np.ndarray, temperature: float) -> float:
    """SimCLR's NT-Xent written as a loop: every one of the 2N embeddings is an anchor whose
    positive is the other view of the same sample; every other embedding is in the denominator."""
    z = np.concatenate([out0, out1], axis=0).astype(np.float64)
    two_n = z.shape[0]
    n = two_n // 2

    def cos(u: np.ndarray, v: np.ndarray) -> float:
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    total = 0.0
    for a in range(two_n):
        p = (a + n) % two_n
        numerator = math.exp(cos(z[a], z[p]) / temperature)
        denominator = sum(math.exp(cos(z[a], z[k]) / temperature) for k in range(two_n) if k != a)
        total += -math.log(numerator / denominator)
    return total / two_n


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ntxent_matches_loop_formula(temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    n, d = 6, 5
    out0 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    out1 = out0 + 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    # cosine similarity: arbitrary positive rescaling of each embedding must not matter
    out1 = out1 * torch.rand(n, 1, generator=gen, dtype=torch.float64).add(0.5)

    loss = NTXentLoss(temperature=temperature, gather_distributed=True)(out0, out1)
    expected = ntxent_reference(out0.numpy(), out1.numpy(), temperature)

    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_ntxent_temperature_changes_value() -> None:
    """The two temperatures above are really exercised (different values)."""
    gen = torch.Generator().manual_seed(1)
    out0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    out1 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    a = NTXentLoss(temperature=0.1, gather_distributed=True)(out0, out1).item()
    b = NTXentLoss(temperature=0.5, gather_distributed=True)(out0, out1).item()
    assert a == pytest.approx(ntxent_reference(out0.numpy(), out1.numpy(), 0.1), rel=1e-10)
    assert b == pytest.approx(ntxent_reference(out0.numpy(), out1.numpy(), 0.5), rel=1e-10)
    assert abs(a - b) > 1e-3


def test_simclr_criterion_is_the_formula_at_its_temperature() -> None:
    """The module's own criterion, not one built by the test: it uses ``temperature`` and gathers
    negatives from every rank (the 2-rank check is in test_distributed.py)."""
    from ssl_kit.methods import SimCLR

    criterion = SimCLR(backbone="resnet18", input_spec=InputSpec.image(8), temperature=0.3).criterion
    assert criterion.gather_distributed
    gen = torch.Generator().manual_seed(2)
    out0, out1 = torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(5, 4, generator=gen, dtype=torch.float64)
    assert criterion(out0, out1).item() == pytest.approx(ntxent_reference(out0.numpy(), out1.numpy(), 0.3), rel=1e-10)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("n", [2, 5])
def test_ntxent_identical_orthogonal_views_closed_form(temperature: float, n: int) -> None:
    """Views are identical one-hot vectors: s(a, p) = 1 and every one of the 2N-2 negatives has
    s = 0, so loss = -log(e^{1/t} / (e^{1/t} + 2N - 2)) for every anchor."""
    out = torch.eye(n, 7, dtype=torch.float64)
    loss = NTXentLoss(temperature=temperature, gather_distributed=True)(out, out.clone())
    e = math.exp(1.0 / temperature)
    expected = -math.log(e / (e + 2 * n - 2))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert ntxent_reference(out.numpy(), out.numpy(), temperature) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------------------------
# Barlow Twins
# --------------------------------------------------------------------------------------------
def barlow_reference(z_a: np.ndarray, z_b: np.ndarray, lambda_param: float, eps: float = 1e-5, ddof: int = 0) -> float:
    """Paper's formula in numpy: standardise each dimension over the batch (mean, variance with
    ``ddof``, + eps), C = z_a^T z_b / N, sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2."""
    z_a = np.asarray(z_a, dtype=np.float64)
    z_b = np.asarray(z_b, dtype=np.float64)
    n = z_a.shape[0]

    def standardise(z: np.ndarray) -> np.ndarray:
        return (z - z.mean(0)) / np.sqrt(z.var(0, ddof=ddof) + eps)

    c = standardise(z_a).T @ standardise(z_b) / n
    on = np.sum((1.0 - np.diag(c)) ** 2)
    off = np.sum(c**2) - np.sum(np.diag(c) ** 2)
    return float(on + lambda_param * off)


def _random_pair(seed: int, n: int = 12, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z_a = 3.0 * torch.randn(n, d, generator=gen, dtype=torch.float64) + 1.0
    z_b = 0.7 * z_a + torch.randn(n, d, generator=gen, dtype=torch.float64) - 2.0
    return z_a, z_b


@pytest.mark.parametrize("lambda_param", [5e-3, 0.5])
def test_barlow_twins_matches_numpy_formula(lambda_param: float) -> None:
    z_a, z_b = _random_pair(0)
    loss = BarlowTwinsLoss(lambda_param=lambda_param)(z_a, z_b)
    expected = barlow_reference(z_a.numpy(), z_b.numpy(), lambda_param)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the redundancy term really contributes (the two lambdas give different values)
    assert barlow_reference(z_a.numpy(), z_b.numpy(), 0.0) < expected - 1e-3


def test_barlow_twins_custom_eps_is_used() -> None:
    z_a, z_b = _random_pair(1, n=6, d=3)
    z_a, z_b = 0.01 * z_a, 0.01 * z_b  # variance ~1e-4: eps = 1e-3 matters a lot
    loss = BarlowTwinsLoss(lambda_param=0.1, eps=1e-3)(z_a, z_b)
    assert loss.item() == pytest.approx(barlow_reference(z_a.numpy(), z_b.numpy(), 0.1, eps=1e-3), rel=1e-5)
    assert loss.item() != pytest.approx(barlow_reference(z_a.numpy(), z_b.numpy(), 0.1, eps=1e-5), rel=1e-2)


def test_barlow_twins_is_zero_for_identical_decorrelated_standardised_inputs() -> None:
    """Columns 1.. of a Sylvester-Hadamard matrix: entries +-1, zero mean, biased variance 1,
    mutually orthogonal. With z_a = z_b, C = I / (1 + eps): loss = D (1 - 1/(1 + eps))^2 ~ 0."""
    h = np.array([[1.0]])
    for _ in range(3):
        h = np.block([[h, h], [h, -h]])
    z = torch.from_numpy(h[:, 1:]).clone()  # (8, 7)
    # affine rescaling per dimension is removed by the standardisation
    z_a = z * torch.linspace(0.5, 4.0, 7, dtype=torch.float64) + 10.0
    z_b = z.clone()
    loss = BarlowTwinsLoss()(z_a, z_b).item()
    eps = 1e-5
    assert loss == pytest.approx(7 * (1 - 1 / math.sqrt(1 + eps) ** 2) ** 2, abs=1e-8)
    assert abs(loss) < 1e-8
    # anti-correlated views: C = -I / (1 + eps) -> each diagonal term is (1 + 1)^2
    assert BarlowTwinsLoss()(z_a, -z_b).item() == pytest.approx(7 * 4.0, rel=1e-4)


def test_barlow_twins_invariant_to_per_dimension_affine_maps() -> None:
    z_a, z_b = _random_pair(2)
    scale = torch.linspace(0.1, 5.0, z_a.shape[1], dtype=torch.float64)
    shift = torch.linspace(-3.0, 3.0, z_a.shape[1], dtype=torch.float64)
    loss_fn = BarlowTwinsLoss(lambda_param=0.05)
    assert loss_fn(z_a * scale + shift, z_b).item() == pytest.approx(loss_fn(z_a, z_b).item(), rel=1e-4)


def test_barlow_twins_gradient_matches_float64_autograd_reference() -> None:
    """Gradient w.r.t. the embeddings equals autograd through an independent float64 torch
    implementation of the same formula."""
    z_a, z_b = _random_pair(3, n=10, d=4)
    lam = 0.2

    def ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        def std(z: torch.Tensor) -> torch.Tensor:
            return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)

        c = std(a).T @ std(b) / a.shape[0]
        off = c - torch.diag(torch.diagonal(c))
        return ((1 - torch.diagonal(c)) ** 2).sum() + lam * (off**2).sum()

    a1, b1 = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    BarlowTwinsLoss(lambda_param=lam)(a1, b1).backward()
    a2, b2 = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    ref(a2, b2).backward()
    assert torch.allclose(a1.grad, a2.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(b1.grad, b2.grad, rtol=1e-4, atol=1e-6)


def test_barlow_twins_relation_to_lightly_single_process() -> None:
    """lightly's ``_normalize`` is ``F.batch_norm(training=True)``, which standardises with the
    *biased* batch variance and eps = 1e-5 (the unbiased estimate only feeds running_var, which
    lightly does not keep). So on one process the two losses are identical; they differ only under
    DDP, where lightly uses per-rank statistics (tests/integration/test_distributed.py)."""
    for seed, lam in [(4, 5e-3), (5, 0.3)]:
        z_a, z_b = _random_pair(seed, n=8, d=5)
        ours = BarlowTwinsLoss(lambda_param=lam)(z_a, z_b).item()
        theirs = LightlyBarlowTwinsLoss(lambda_param=lam, gather_distributed=True)(z_a, z_b).item()
        assert ours == pytest.approx(theirs, rel=1e-5)
        assert theirs == pytest.approx(barlow_reference(z_a.numpy(), z_b.numpy(), lam, ddof=0), rel=1e-10)
        # an unbiased (N-1) normalisation would be a measurably different loss at N = 8
        assert theirs != pytest.approx(barlow_reference(z_a.numpy(), z_b.numpy(), lam, ddof=1), rel=1e-3)


# --------------------------------------------------------------------------------------------
# Mixed Barlow Twins (Bandara et al. 2023): the mixed-sample regulariser
# --------------------------------------------------------------------------------------------
def mixed_barlow_reference(z_a, z_b, z_m, mix: float, partner, lambda_param: float, weight: float, eps: float = 1e-5) -> float:
    """The paper's regulariser written out with its target matrices: every embedding standardised
    over the batch, C^{MA} = Z_m^T Z_a / N against mix Z_a^T Z_a / N + (1 - mix) Z_b[partner]^T Z_a / N,
    C^{MB} = Z_m^T Z_b / N against mix Z_a^T Z_b / N + (1 - mix) Z_b[partner]^T Z_b / N; the squared
    differences summed, times weight * lambda, added to the Barlow Twins loss."""
    z_a, z_b, z_m = (np.asarray(z, dtype=np.float64) for z in (z_a, z_b, z_m))
    n = z_a.shape[0]

    def standardise(z: np.ndarray) -> np.ndarray:
        return (z - z.mean(0)) / np.sqrt(z.var(0) + eps)

    a, b, m = standardise(z_a), standardise(z_b), standardise(z_m)
    shuffled = b[np.asarray(partner)]
    c_ma, c_mb = m.T @ a / n, m.T @ b / n
    target_ma = mix * (a.T @ a) / n + (1 - mix) * (shuffled.T @ a) / n
    target_mb = mix * (a.T @ b) / n + (1 - mix) * (shuffled.T @ b) / n
    regulariser = np.sum((c_ma - target_ma) ** 2) + np.sum((c_mb - target_mb) ** 2)
    return barlow_reference(z_a, z_b, lambda_param) + weight * lambda_param * float(regulariser)


def _mixed_triple(seed: int, n: int = 10, d: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    z_a, z_b = _random_pair(seed, n, d)
    gen = torch.Generator().manual_seed(seed + 100)
    partner = torch.randperm(n, generator=gen)
    z_m = 0.3 * z_a + 0.7 * z_b[partner] + 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return z_a, z_b, z_m, partner


@pytest.mark.parametrize("mix, weight, lambda_param", [(0.3, 4.0, 0.0078125), (0.8, 1.0, 0.5)])
def test_mixed_barlow_twins_matches_the_papers_formula(mix: float, weight: float, lambda_param: float) -> None:
    z_a, z_b, z_m, partner = _mixed_triple(6)
    loss = BarlowTwinsLoss(lambda_param=lambda_param, mixup_weight=weight)(z_a, z_b, z_m, mix, partner).item()
    expected = mixed_barlow_reference(z_a, z_b, z_m, mix, partner, lambda_param, weight)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert expected > barlow_reference(z_a.numpy(), z_b.numpy(), lambda_param) + 1e-3  # the regulariser contributes
    # the partner permutation matters (not the identity pairing)
    assert loss != pytest.approx(mixed_barlow_reference(z_a, z_b, z_m, mix, torch.arange(10), lambda_param, weight), rel=1e-4)


def test_mixed_barlow_twins_weight_zero_is_plain_barlow_twins_exactly() -> None:
    z_a, z_b, z_m, partner = _mixed_triple(7)
    plain = BarlowTwinsLoss(lambda_param=0.1)(z_a, z_b)
    assert torch.equal(BarlowTwinsLoss(lambda_param=0.1, mixup_weight=0.0)(z_a, z_b, z_m, 0.4, partner), plain)

    from ssl_kit.methods import BarlowTwins

    heads = {"backbone": "resnet18", "input_spec": InputSpec.image(8), "projection_hidden_dim": 16, "projection_dim": 16}
    torch.manual_seed(0)
    default = BarlowTwins(**heads)
    torch.manual_seed(0)
    off = BarlowTwins(**heads, mixup_weight=0.0)
    assert default.state_dict().keys() == off.state_dict().keys()
    assert all(torch.equal(v, off.state_dict()[k]) for k, v in default.state_dict().items())
    views = [torch.randn(6, 3, 8, 8) for _ in range(2)]
    assert torch.equal(default.training_loss(views)[0], off.training_loss(views)[0])


def test_barlow_twins_method_mixes_the_views_and_adds_the_regulariser() -> None:
    from ssl_kit.methods import BarlowTwins

    model = BarlowTwins(backbone="resnet18", input_spec=InputSpec.image(8), projection_hidden_dim=16, projection_dim=16, mixup_weight=4.0)
    x_a, x_b = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    torch.manual_seed(1)
    x_m, mix, partner = model.mixup(x_a, x_b)
    assert 0.0 <= mix.item() <= 1.0 and sorted(partner.tolist()) == list(range(6))
    assert torch.allclose(x_m, mix * x_a + (1 - mix) * x_b[partner])

    torch.manual_seed(1)  # training_loss draws the same mix and partner
    loss, features = model.training_loss([x_a, x_b])
    with torch.no_grad():  # train mode: the same batches give the same embeddings again
        z_a, z_b, z_m = (model.projector(model.backbone(x)) for x in (x_a, x_b, x_m))
    expected = mixed_barlow_reference(z_a, z_b, z_m, mix.item(), partner, 5e-3, 4.0)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert loss.item() > BarlowTwinsLoss()(z_a, z_b).item()
    assert features.shape == (6, model.feature_dim)


MIX_WORLD_SIZE, MIX_BATCH, MIX_IN, MIX_OUT = 2, 12, 5, 6


def _mixed_ddp_problem() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], float]:
    """Inputs of both views, one partner permutation per rank (within its half), one mix for all."""
    gen = torch.Generator().manual_seed(21)
    x_a = torch.randn(MIX_BATCH, MIX_IN, generator=gen, dtype=torch.float64)
    x_b = x_a + 0.3 * torch.randn(MIX_BATCH, MIX_IN, generator=gen, dtype=torch.float64)
    x_a[MIX_BATCH // 2 :] = 2.0 * x_a[MIX_BATCH // 2 :] + 1.0  # different per-rank statistics
    partners = [torch.randperm(MIX_BATCH // MIX_WORLD_SIZE, generator=gen) for _ in range(MIX_WORLD_SIZE)]
    return x_a, x_b, partners, 0.35


def _mixed_ddp_case(model, x_a, x_b, partner, mix) -> dict[str, torch.Tensor]:
    linear = model.module.linear if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model.linear
    x_m = mix * x_a + (1 - mix) * x_b[partner]
    z_a, z_b = model(x_a, x_b)
    z_m, _ = model(x_m, x_m)
    loss = BarlowTwinsLoss(lambda_param=0.05, mixup_weight=4.0)(z_a, z_b, z_m, mix, partner)
    loss.backward()
    return {"loss": loss.detach().double(), "weight_grad": linear.weight.grad.clone(), "bias_grad": linear.bias.grad.clone()}


def _mixed_ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from pathlib import Path

    from ddp import gloo_group, seeded_two_view_linear

    with gloo_group(rank, world_size, port):
        x_a, x_b, partners, mix = _mixed_ddp_problem()
        half = MIX_BATCH // world_size
        local = slice(rank * half, (rank + 1) * half)
        model = torch.nn.parallel.DistributedDataParallel(seeded_two_view_linear(MIX_IN, MIX_OUT, seed=3))
        results = _mixed_ddp_case(model, x_a[local], x_b[local], partners[rank], mix)
        from ssl_kit.methods import BarlowTwins

        torch.manual_seed(rank)  # different random streams: the method's mix must still be rank 0's
        results["method_mix"] = BarlowTwins.mixup(x_a[local], x_b[local])[1]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    from ddp import spawn_ranks

    return spawn_ranks(_mixed_ddp_worker, tmp_path_factory.mktemp("mixed_barlow_ddp"), MIX_WORLD_SIZE)


def test_mixed_barlow_twins_two_ranks_equal_one_process_on_the_global_batch(ranks: list[dict]) -> None:
    """Each rank pairs its own samples; one process with the same pairs (block permutation) and the
    same mix gives every rank's loss and the DDP-averaged gradients. The method draws one mix for the
    whole global batch: rank 0's, on ranks whose random streams differ."""
    from ddp import seeded_two_view_linear

    x_a, x_b, partners, mix = _mixed_ddp_problem()
    half = MIX_BATCH // MIX_WORLD_SIZE
    global_partner = torch.cat([p + r * half for r, p in enumerate(partners)])
    reference = _mixed_ddp_case(seeded_two_view_linear(MIX_IN, MIX_OUT, seed=3), x_a, x_b, global_partner, mix)
    assert reference["weight_grad"].abs().max() > 1e-3
    for r in ranks:
        assert r["loss"].item() == pytest.approx(reference["loss"].item(), rel=1e-6)
        assert torch.allclose(r["weight_grad"], reference["weight_grad"], atol=1e-5)
        assert torch.allclose(r["bias_grad"], reference["bias_grad"], atol=1e-5)
    torch.manual_seed(0)
    assert [r["method_mix"].item() for r in ranks] == [torch.rand(()).item()] * MIX_WORLD_SIZE


def test_mixed_barlow_twins_cli_run_on_digits(tmp_path) -> None:
    from helpers import fit

    cli = fit("barlow_twins_digits.yaml", tmp_path, "--trainer.max_epochs", "1", "--model.mixup_weight", "4.0",
              "--model.projection_hidden_dim", "64", "--model.projection_dim", "64")  # fmt: skip
    assert cli.trainer.global_step == 2 and cli.model.criterion.mixup_weight == 4.0
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
