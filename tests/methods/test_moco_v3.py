"""MoCo v3: InfoNCE against its formula, 2-rank DDP equivalence, the momentum encoder (no
gradients, no optimizer group, one EMA update per optimizer step), and learning on MNIST."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from helpers import MNIST_RUN, against_random_init, configured_optimizer, fit, fresh_copy, needs_mnist
from ddp import TwoViewLinear, gloo_group, seeded_two_view_linear, spawn_ranks
from ssl_kit.inputs import InputSpec
from ssl_kit.losses.moco import InfoNCELoss
from ssl_kit.methods.momentum import EMAUpdater, momentum_at
from ssl_kit.methods.moco_v3 import MoCoV3


SMALL_HEADS = {"projection_hidden_dim": 32, "projection_dim": 16, "prediction_hidden_dim": 32}


# --------------------------------------------------------------------------------------------
# InfoNCE against the formula
# --------------------------------------------------------------------------------------------
def unit_rows(v: Tensor) -> list[list[float]]:
    rows = v.tolist()
    return [[c / math.sqrt(sum(x * x for x in row)) for c in row] for row in rows]


def loop_ctr(q: Tensor, k: Tensor, temperature: float, rank: int = 0, all_keys: Tensor | None = None) -> float:
    """-1/N sum_i log(exp(q_i.k_{rN+i}/T) / sum_j exp(q_i.k_j/T)) * 2T, unit vectors, plain loops."""
    keys = k if all_keys is None else all_keys
    qs, ks = unit_rows(q), unit_rows(keys)
    total = 0.0
    for i, qi in enumerate(qs):
        logits = [sum(a * b for a, b in zip(qi, kj)) / temperature for kj in ks]
        total += -logits[rank * len(qs) + i] + math.log(sum(math.exp(s) for s in logits))
    return total / len(qs) * 2 * temperature


def test_infonce_matches_explicit_formula():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(5, 4, generator=gen, dtype=torch.float64)
    for temperature in (0.2, 1.0):
        got = InfoNCELoss(temperature)(q, k).item()
        assert got == pytest.approx(loop_ctr(q, k, temperature), rel=1e-6)
        plain = InfoNCELoss(temperature, scale_by_temperature=False)(q, k).item()
        assert plain == pytest.approx(loop_ctr(q, k, temperature) / (2 * temperature), rel=1e-6)
    # scale invariance of the inputs (both are L2-normalised)
    assert InfoNCELoss(0.2)(3.0 * q, 0.5 * k).item() == pytest.approx(loop_ctr(q, k, 0.2), rel=1e-6)


def test_symmetric_infonce_is_sum_of_crossed_terms_and_keys_get_no_gradient():
    gen = torch.Generator().manual_seed(1)
    q1, q2, k1, k2 = (torch.randn(6, 3, generator=gen, dtype=torch.float64) for _ in range(4))
    q1.requires_grad_(), q2.requires_grad_(), k1.requires_grad_(), k2.requires_grad_()
    loss = InfoNCELoss(0.2).symmetric(q1, q2, k1, k2)
    expected = loop_ctr(q1.detach(), k2.detach(), 0.2) + loop_ctr(q2.detach(), k1.detach(), 0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # not the "uncrossed" pairing
    assert loss.item() != pytest.approx(loop_ctr(q1.detach(), k1.detach(), 0.2) + loop_ctr(q2.detach(), k2.detach(), 0.2), rel=1e-3)
    loss.backward()
    assert q1.grad is not None and q1.grad.abs().max() > 0 and q2.grad.abs().max() > 0
    assert k1.grad is None and k2.grad is None


# --------------------------------------------------------------------------------------------
# heads and position embeddings as the official builder (MoCo_ResNet, MoCo_ViT)
# --------------------------------------------------------------------------------------------
def layers_of(head: nn.Module) -> list[nn.Module]:
    return [m for m in head.modules() if isinstance(m, (nn.Linear, nn.BatchNorm1d, nn.ReLU))]


@pytest.mark.parametrize(
    "backbone, projector_linears, predictor_last_bn", [("resnet18", 2, False), ("vit_tiny_patch16_224", 3, True)]
)
def test_heads_follow_the_official_builder(backbone, projector_linears, predictor_last_bn):
    """ResNet: 2-layer projector, predictor without the last BN; ViT: 3-layer projector, predictor
    with it. Every Linear without bias, hidden blocks Linear-BN-ReLU, the projector's last BN
    without affine parameters."""
    model = MoCoV3(backbone=backbone, input_spec=InputSpec.image(8), **SMALL_HEADS)
    for head, linears, last_bn in [(model.projector, projector_linears, True), (model.predictor, 2, predictor_last_bn)]:
        layers = layers_of(head)
        kinds = [type(m).__name__ for m in layers]
        hidden = ["Linear", "BatchNorm1d", "ReLU"] * (linears - 1)
        assert kinds == hidden + (["Linear", "BatchNorm1d"] if last_bn else ["Linear"])
        assert all(m.bias is None for m in layers if isinstance(m, nn.Linear))
        if last_bn:
            assert not layers[-1].affine
    assert layers_of(model.projector)[-2].out_features == 16 and layers_of(model.predictor)[0].in_features == 16


def test_vit_position_embeddings_are_fixed_2d_sincos_in_both_encoders():
    from ssl_kit.models.patches import sincos_grid

    model = MoCoV3(backbone="vit_tiny_patch16_224", input_spec=InputSpec.image(8), **SMALL_HEADS)
    pos = model.backbone.pos_embed
    assert not pos.requires_grad and not pos[0, 0].any()
    assert torch.equal(pos[0, 1:], sincos_grid(pos.shape[-1], (2, 2)))
    assert torch.equal(model.momentum_backbone.pos_embed, pos)
    optimised = {id(p) for group in configured_optimizer(model).param_groups for p in group["params"]}
    assert id(pos) not in optimised
    assert MoCoV3(backbone="vit_tiny_patch16_224", input_spec=InputSpec.image(8), fixed_pos_embed=False, **SMALL_HEADS).backbone.pos_embed.requires_grad


# --------------------------------------------------------------------------------------------
# momentum encoder: no gradients, not optimised
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backbone, image_size, extra",
    [("resnet18", 8, {}), ("vit_tiny_patch16_224", 8, {"freeze_patch_embed": True, "optimizer": "adamw"})],
)
def test_momentum_encoder_gets_no_gradient_and_is_in_no_optimizer_group(backbone, image_size, extra):
    L.seed_everything(0)
    model = MoCoV3(backbone=backbone, input_spec=InputSpec.image(image_size), **SMALL_HEADS, **extra)
    views = [torch.randn(8, 3, image_size, image_size) for _ in range(2)]
    loss, features = model.training_loss(views)
    assert features.shape == (8, model.feature_dim)
    loss.backward()

    momentum = [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
    assert momentum and all(not p.requires_grad and p.grad is None for p in momentum)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())

    optimizer = configured_optimizer(model)
    optimised = [p for group in optimizer.param_groups for p in group["params"]]
    optimised_ids = {id(p) for p in optimised}
    assert len(optimised_ids) == len(optimised)  # no parameter twice
    assert not optimised_ids & {id(p) for p in momentum}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert optimised_ids == trainable  # backbone, projector, predictor, probe: all of them
    if extra.get("freeze_patch_embed"):
        frozen = list(model.backbone.patch_embed.parameters())
        assert frozen and not {id(p) for p in frozen} & optimised_ids
        assert all(p.grad is None for p in frozen)

    # the momentum encoder starts as an exact copy of the online encoder
    for t, o in zip(model.momentum_backbone.state_dict().values(), model.backbone.state_dict().values()):
        assert torch.equal(t, o)


# --------------------------------------------------------------------------------------------
# momentum schedule and one EMA update per optimizer step
# --------------------------------------------------------------------------------------------
def test_cosine_momentum_schedule_values():
    assert momentum_at(0, 0 / 100, 0.99, 1.0, "cosine") == pytest.approx(0.99)
    assert momentum_at(25, 25 / 100, 0.99, 1.0, "cosine") == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi / 4)) / 2)
    assert momentum_at(50, 50 / 100, 0.99, 1.0, "cosine") == pytest.approx(0.995)
    assert momentum_at(100, 100 / 100, 0.99, 1.0, "cosine") == pytest.approx(1.0)
    assert momentum_at(150, 150 / 100, 0.99, 1.0, "cosine") == pytest.approx(1.0)


def ten_step_run(step: int) -> float:
    """The run fraction of a 10-step run."""
    return step / 10


def test_ema_updater_moves_once_per_optimizer_step_with_the_formula():
    torch.manual_seed(0)
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    updater = EMAUpdater([(target, online)], base=0.9, final=1.0, schedule="cosine")
    updater.start(0)
    t0 = {k: v.clone() for k, v in target.state_dict().items()}
    o0 = {k: v.clone() for k, v in online.state_dict().items()}

    # gradient accumulation: a batch without an optimizer step (global_step still 0) does nothing
    assert updater.step(0, ten_step_run) is False
    assert all(torch.equal(target.state_dict()[k], t0[k]) for k in t0)

    assert updater.step(1, ten_step_run) is True  # first optimizer step: momentum of step 0 = base
    assert updater.momentum == pytest.approx(0.9)
    for k in t0:
        assert torch.allclose(target.state_dict()[k], 0.9 * t0[k] + 0.1 * o0[k], atol=1e-7)
    t1 = {k: v.clone() for k, v in target.state_dict().items()}

    assert updater.step(1, ten_step_run) is False  # second micro-batch of the same optimizer step
    assert all(torch.equal(target.state_dict()[k], t1[k]) for k in t1)

    with torch.no_grad():
        online.weight.add_(1.0)
    assert updater.step(2, ten_step_run) is True
    m = momentum_at(1, 1 / 10, 0.9, 1.0, "cosine")
    assert updater.momentum == pytest.approx(m) and 0.9 < m < 1.0
    assert torch.allclose(target.weight, m * t1["weight"] + (1 - m) * online.weight, atol=1e-7)


def test_cli_run_with_gradient_accumulation_updates_once_per_optimizer_step(tmp_path, monkeypatch):
    """The real Trainer hooks: 4 batches, accumulate 2 -> 2 optimizer steps -> 2 EMA updates."""
    import ssl_kit.methods.momentum as momentum_module

    calls: list[float] = []
    original = momentum_module.ema_update
    monkeypatch.setattr(
        momentum_module, "ema_update", lambda t, o, m: (calls.append(m), original(t, o, m))[1]
    )
    cli = fit(
        "moco_v3_digits.yaml", tmp_path,
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.accumulate_grad_batches", "2",
        "--trainer.limit_val_batches", "0", "--model.projection_hidden_dim", "32", "--model.projection_dim", "16",
        "--model.prediction_hidden_dim", "32",
    )  # fmt: skip
    assert cli.trainer.global_step == 2
    pairs = len(cli.model.ema.pairs)
    assert len(calls) == 2 * pairs
    # the momentum of optimizer step s is momentum_at(s) along the run's 2 steps
    assert calls[0] == pytest.approx(momentum_at(0, 0 / 2, 0.99, 1.0)) and calls[-1] == pytest.approx(momentum_at(1, 1 / 2, 0.99, 1.0))
    assert cli.model.ema.last_step == 2


# --------------------------------------------------------------------------------------------
# 2-rank DDP equivalence (gloo, CPU)
# --------------------------------------------------------------------------------------------
WORLD_SIZE = 2
GLOBAL_BATCH = 12
IN_DIM, OUT_DIM = 5, 7
TEMPERATURE = 0.2


def make_query_model() -> TwoViewLinear:
    """The 'query encoder': both views through one linear map."""
    return seeded_two_view_linear(IN_DIM, OUT_DIM, seed=4321)


def make_ddp_data() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(7)
    x1 = torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen, dtype=torch.float64)
    # fixed "momentum encoder" keys, correlated with the queries so the positives matter
    proj = torch.randn(IN_DIM, OUT_DIM, generator=gen, dtype=torch.float64)
    k1 = x1 @ proj + 0.1 * torch.randn(GLOBAL_BATCH, OUT_DIM, generator=gen, dtype=torch.float64)
    k2 = x2 @ proj + 0.1 * torch.randn(GLOBAL_BATCH, OUT_DIM, generator=gen, dtype=torch.float64)
    return {"x1": x1, "x2": x2, "k1": k1, "k2": k2}


def run_symmetric(model: nn.Module, data: dict[str, Tensor]) -> dict[str, Tensor]:
    q1, q2 = model(data["x1"], data["x2"])
    loss = InfoNCELoss(TEMPERATURE).symmetric(q1, q2, data["k1"], data["k2"])
    loss.backward()
    linear = model.module.linear if isinstance(model, nn.parallel.DistributedDataParallel) else model.linear
    return {"loss": loss.detach(), "weight_grad": linear.weight.grad.clone(), "bias_grad": linear.bias.grad.clone()}


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world_size, port):
        per_rank = GLOBAL_BATCH // world_size
        local = slice(rank * per_rank, (rank + 1) * per_rank)
        data = {name: t[local] for name, t in make_ddp_data().items()}
        model = nn.parallel.DistributedDataParallel(make_query_model())
        results = {"world_size": dist.get_world_size(), "symmetric": run_symmetric(model, data)}
        # the loss of this rank's queries against its *local* keys only, for contrast
        q1 = model.module.linear(data["x1"]).detach()
        results["local_keys_loss"] = torch.nn.functional.cross_entropy(
            torch.nn.functional.normalize(q1, dim=1) @ torch.nn.functional.normalize(data["k2"], dim=1).T / TEMPERATURE,
            torch.arange(per_rank),
        ) * 2 * TEMPERATURE
        results["ctr_q1_k2"] = InfoNCELoss(TEMPERATURE)(q1, data["k2"])
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("moco_ddp"), WORLD_SIZE)


def test_two_rank_infonce_equals_one_process_on_the_global_batch(ranks: list[dict]):
    assert not dist.is_initialized()
    data = make_ddp_data()
    reference = run_symmetric(make_query_model(), data)
    assert [r["world_size"] for r in ranks] == [WORLD_SIZE] * WORLD_SIZE
    assert reference["weight_grad"].abs().max() > 1e-3  # a non-trivial gradient

    losses = torch.stack([r["symmetric"]["loss"] for r in ranks])
    assert losses.mean().item() == pytest.approx(reference["loss"].item(), abs=1e-5)
    assert abs(losses[0].item() - losses[1].item()) > 1e-6  # each rank's own queries
    for r in ranks:  # DDP-averaged gradients
        assert torch.allclose(r["symmetric"]["weight_grad"], reference["weight_grad"], atol=1e-5)
        assert torch.allclose(r["symmetric"]["bias_grad"], reference["bias_grad"], atol=1e-5)

    # rank r's queries see the keys of both ranks (positives at offset r * N): the gathered loss
    # matches the explicit formula over all keys, and differs from a local-keys-only loss
    model = make_query_model()
    per_rank = GLOBAL_BATCH // WORLD_SIZE
    for rank, r in enumerate(ranks):
        q1 = model.linear(data["x1"][rank * per_rank : (rank + 1) * per_rank]).detach()
        expected = loop_ctr(q1, None, TEMPERATURE, rank=rank, all_keys=data["k2"])
        assert r["ctr_q1_k2"].item() == pytest.approx(expected, rel=1e-6)
        assert r["ctr_q1_k2"].item() > r["local_keys_loss"].item() + 1e-4


# --------------------------------------------------------------------------------------------
# learning on MNIST
# --------------------------------------------------------------------------------------------
@needs_mnist
@pytest.mark.slow
def test_moco_v3_learns_beyond_random_init_features(tmp_path):
    """A linear probe on the trained (half-width) ResNet-18's frozen features clearly beats the
    same probe at random init (measured: 0.919 vs 0.889). A short run wants a momentum encoder that
    moves faster than the config's 0.99, a higher lr and more steps (batch 64: 156 steps)."""
    from ssl_kit.models import backbone_from_checkpoint

    cli = fit("moco_v3_mnist.yaml", tmp_path, *MNIST_RUN, "--data.batch_size", "64", "--model.ema_momentum", "0.9", "--model.lr", "2.4")
    accuracy = against_random_init(cli, "moco_v3_mnist")
    trained, random_init = accuracy["linear"]
    assert trained >= random_init + 0.02
    assert cli.trainer.callback_metrics["val/knn_acc"].item() == pytest.approx(accuracy["knn"][0], abs=1e-6)

    # the momentum encoder moved (EMA) but is neither the online encoder nor its initial state
    model = cli.model
    online = dict(model.backbone.named_parameters())
    fresh = fresh_copy(model)
    moved = [name for name, p in model.momentum_backbone.named_parameters() if not torch.equal(p, fresh.backbone.get_parameter(name))]
    assert moved and any(not torch.equal(p, online[name]) for name, p in model.momentum_backbone.named_parameters())
    assert 0.99 < model.ema.momentum <= 1.0

    # export takes the online backbone, not the momentum copy
    state, _ = backbone_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert state.keys() == model.backbone.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.backbone.state_dict().items())
