"""Task balancers and the gradient-cosine monitor, pinned on tiny hand-computable models; the balancer
configs instantiate, and the balancing ablations compose into ``train``."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from convcg_cli import config
from convcg_cli.config import CONF_DIR, instantiate
from convcg_cli.models.balancing import (
    GRAD_COSINE_METRIC,
    GradNorm,
    StaticWeights,
    TaskBalancer,
    UncertaintyWeighting,
    last_linear_weight,
    task_gradient_cosine,
)
from convcg_cli.tasks import CONVERSION, ENGAGEMENT

WEIGHTS = {CONVERSION: 1.0, ENGAGEMENT: 0.3}
LOSSES = {CONVERSION: torch.tensor(0.8), ENGAGEMENT: torch.tensor(2.0)}
BALANCERS = {"static": StaticWeights, "uncertainty": UncertaintyWeighting, "gradnorm": GradNorm}
BALANCER_ABLATIONS = {"uncertainty_weighting": "uncertainty", "gradnorm": "gradnorm"}


def as_floats(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    return {t: round(w.item(), 6) for t, w in weights.items()}


def linear_losses(w: nn.Parameter, a: list[float], b: list[float]) -> dict[str, torch.Tensor]:
    """L_conversion = a . w and L_engagement = b . w: gradients a and b, exactly."""
    return {CONVERSION: (torch.tensor(a) * w).sum(), ENGAGEMENT: (torch.tensor(b) * w).sum()}


# --- validation shared by every balancer -------------------------------------------------------------


@pytest.mark.parametrize("cls", list(BALANCERS.values()))
def test_bad_task_weights_are_rejected(cls: type[TaskBalancer]) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        cls({CONVERSION: 1.0, ENGAGEMENT: -0.1})
    with pytest.raises(ValueError, match="At least one"):
        cls({CONVERSION: 0.0, ENGAGEMENT: 0.0})
    with pytest.raises(Exception, match="Unknown task"):
        cls({CONVERSION: 1.0, "clicks": 0.3})


@pytest.mark.parametrize("cls", list(BALANCERS.values()))
def test_missing_loss_of_an_active_task_is_an_error(cls: type[TaskBalancer]) -> None:
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(KeyError, match="missing: \\['engagement'\\]"):
        cls(WEIGHTS)({CONVERSION: w.sum()}, [w])


# --- StaticWeights -----------------------------------------------------------------------------------


def test_static_is_the_weighted_sum() -> None:
    total, weights = StaticWeights(WEIGHTS)(LOSSES, [])
    assert total.item() == pytest.approx(1.0 * 0.8 + 0.3 * 2.0, abs=1e-6)
    assert total.item() == pytest.approx(1.4, abs=1e-6)
    assert as_floats(weights) == {CONVERSION: 1.0, ENGAGEMENT: 0.3}
    assert not any(w.requires_grad for w in weights.values())


def test_static_skips_a_zero_weight_task() -> None:
    balancer = StaticWeights({CONVERSION: 1.0, ENGAGEMENT: 0.0})
    total, weights = balancer(LOSSES, [])  # engagement's loss is given but switched off
    assert total.item() == pytest.approx(0.8, abs=1e-6)
    assert list(weights) == [CONVERSION]
    assert balancer({CONVERSION: torch.tensor(0.8)}, [])[0].item() == pytest.approx(0.8, abs=1e-6)


# --- UncertaintyWeighting ----------------------------------------------------------------------------


def test_uncertainty_exact_formula() -> None:
    balancer = UncertaintyWeighting(WEIGHTS)
    with torch.no_grad():
        balancer.log_vars.copy_(torch.tensor([0.5, -1.0]))
    total, weights = balancer(LOSSES, [])
    # sum_t w_t * (exp(-s_t) * L_t + s_t / 2)
    expected = 1.0 * (math.exp(-0.5) * 0.8 + 0.25) + 0.3 * (math.exp(1.0) * 2.0 - 0.5)
    assert total.item() == pytest.approx(expected, abs=1e-6)
    assert total.item() == pytest.approx(2.216194, abs=1e-5)
    assert as_floats(weights) == {CONVERSION: round(math.exp(-0.5), 6), ENGAGEMENT: round(0.3 * math.e, 6)}


def test_uncertainty_starts_at_the_configured_weights() -> None:
    total, weights = UncertaintyWeighting(WEIGHTS)(LOSSES, [])
    assert total.item() == pytest.approx(1.4, abs=1e-6)  # s = 0: the static sum, regulariser 0
    assert as_floats(weights) == {CONVERSION: 1.0, ENGAGEMENT: 0.3}


def test_uncertainty_gradients_reach_the_log_variances() -> None:
    balancer = UncertaintyWeighting(WEIGHTS)
    losses = {t: v.clone().requires_grad_() for t, v in LOSSES.items()}
    total, _ = balancer(losses, [])
    total.backward()
    # d/ds_t = w_t * (1/2 - exp(-s_t) L_t), at s = 0
    assert balancer.log_vars.grad.tolist() == pytest.approx([1.0 * (0.5 - 0.8), 0.3 * (0.5 - 2.0)], abs=1e-6)
    # d/dL_t = effective weight w_t exp(-s_t)
    assert losses[ENGAGEMENT].grad.item() == pytest.approx(0.3, abs=1e-6)


def test_uncertainty_optimum_keeps_the_configured_ratio() -> None:
    # At s_t = log(2 L_t) the gradient in s vanishes and the effective weight is w_t / (2 L_t).
    balancer = UncertaintyWeighting(WEIGHTS)
    with torch.no_grad():
        balancer.log_vars.copy_(torch.log(2 * torch.stack(list(LOSSES.values()))))
    total, weights = balancer(LOSSES, [])
    total.backward()
    assert balancer.log_vars.grad.abs().max().item() < 1e-6
    assert as_floats(weights) == {CONVERSION: round(1.0 / 1.6, 6), ENGAGEMENT: round(0.3 / 4.0, 6)}


def test_uncertainty_skips_a_zero_weight_task() -> None:
    balancer = UncertaintyWeighting({CONVERSION: 1.0, ENGAGEMENT: 0.0})
    assert balancer.log_vars.shape == (1,)
    total, weights = balancer(LOSSES, [])
    assert total.item() == pytest.approx(0.8, abs=1e-6)
    assert list(weights) == [CONVERSION]


# --- GradNorm ----------------------------------------------------------------------------------------


def test_gradnorm_loss_matches_hand_computation() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    balancer = GradNorm({CONVERSION: 1.0, ENGAGEMENT: 1.0}, alpha=1.5)
    # First call: grad norms 5 and 1, L(0) = (11, 2), r = 1, target = mean(G) = 3.
    losses = linear_losses(w, [3.0, 4.0], [0.0, 1.0])
    total, _ = balancer(losses, [w])
    assert total.item() == pytest.approx(11.0 + 2.0 + abs(5 - 3) + abs(1 - 3), abs=1e-5)
    assert balancer.initial_losses.tolist() == [11.0, 2.0]

    # Second call: L = (5.5, 2) -> Ltilde = (0.5, 1), r = (2/3, 4/3); grad norms 2.5 and 1.
    losses = linear_losses(w, [1.5, 2.0], [0.0, 1.0])
    total, _ = balancer(losses, [w])
    r = torch.tensor([0.5, 1.0]) / 0.75
    target = 1.75 * r**1.5
    expected = 5.5 + 2.0 + abs(2.5 - target[0].item()) + abs(1.0 - target[1].item())
    assert total.item() == pytest.approx(expected, abs=1e-5)
    assert total.item() == pytest.approx(10.741722, abs=1e-5)
    balancer.weights.grad = None
    total.backward()
    # d|G_t - target_t| / d w_t = sign(G_t - target_t) * ||grad L_t||
    assert balancer.weights.grad.tolist() == pytest.approx([2.5, -1.0], abs=1e-6)


def test_gradnorm_term_touches_only_the_weights() -> None:
    torch.manual_seed(0)
    shared, head = nn.Linear(3, 4), nn.Linear(4, 2)
    x, y = torch.randn(8, 3), torch.randn(8, 2)

    def losses() -> dict[str, torch.Tensor]:
        out = head(torch.tanh(shared(x)))  # (8, 2)
        return {CONVERSION: ((out - y) ** 2).mean(), ENGAGEMENT: (out**2).mean()}

    balancer = GradNorm(WEIGHTS)
    with torch.no_grad():
        balancer.weights.copy_(torch.tensor([0.9, 0.4]))  # renormalised to sum 1.3 by forward
    total, weights = balancer(losses(), [shared.weight])
    total.backward()
    got = [p.grad.clone() for p in (*shared.parameters(), *head.parameters())]
    assert as_floats(weights) == {CONVERSION: 0.9, ENGAGEMENT: 0.4}
    assert balancer.weights.grad is not None and balancer.weights.grad.abs().sum() > 0

    for p in (*shared.parameters(), *head.parameters()):
        p.grad = None
    plain = losses()
    (0.9 * plain[CONVERSION] + 0.4 * plain[ENGAGEMENT]).backward()
    for g, p in zip(got, (*shared.parameters(), *head.parameters()), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_gradnorm_balances_a_ten_times_larger_gradient() -> None:
    # Engagement's loss is 10x conversion's, so its gradient is exactly 10x larger and both train at
    # the same relative rate (r_t = 1): GradNorm must move towards w_e / w_c = 1/10, i.e. equal G_t.
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    shared, head = nn.Linear(3, 4, bias=False), nn.Linear(4, 2)

    def losses() -> dict[str, torch.Tensor]:
        base = ((head(torch.tanh(shared(x))) - y) ** 2).mean()
        return {CONVERSION: base, ENGAGEMENT: 10 * base}

    def weighted_norm_ratio(weights: dict[str, torch.Tensor]) -> float:
        ls = losses()
        norms = {t: torch.autograd.grad(ls[t], shared.weight, retain_graph=True)[0].norm() for t in ls}
        return (weights[ENGAGEMENT] * norms[ENGAGEMENT] / (weights[CONVERSION] * norms[CONVERSION])).item()

    balancer = GradNorm({CONVERSION: 1.0, ENGAGEMENT: 1.0}, alpha=1.5)
    model_params = [*shared.parameters(), *head.parameters()]
    opt = torch.optim.SGD(
        [{"params": model_params, "lr": 0.01}, {"params": balancer.parameters(), "lr": 0.02}]
    )
    ratios = []
    for _ in range(60):
        total, weights = balancer(losses(), [shared.weight])
        ratios.append(weighted_norm_ratio(weights))
        opt.zero_grad()
        total.backward()
        opt.step()
    _, weights = balancer(losses(), [shared.weight])  # renormalises the last step's weights

    assert ratios[0] == pytest.approx(10.0, abs=1e-4)
    # The L1 GradNorm loss makes the weights step across the balance point; they settle into a band.
    assert ratios[20] == pytest.approx(1.5043, abs=1e-3)
    assert all(0.9 < r < 1.11 for r in ratios[-20:])
    assert ratios[-2:] == pytest.approx([1.0537, 0.9152], abs=1e-3)
    # Heading for the exact balance w = (20/11, 2/11) = (1.818, 0.182).
    assert as_floats(weights) == pytest.approx({CONVERSION: 1.8097, ENGAGEMENT: 0.1903}, abs=1e-3)
    assert sum(w.item() for w in weights.values()) == pytest.approx(2.0, abs=1e-6)


def test_gradnorm_renormalises_to_the_initial_sum_at_the_start_of_forward() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    balancer = GradNorm(WEIGHTS)
    with torch.no_grad():
        balancer.weights.copy_(torch.tensor([3.0, -1.0]))  # a step overshot below zero
    _, weights = balancer(linear_losses(w, [3.0, 4.0], [0.0, 1.0]), [w])
    assert balancer.weights.sum().item() == pytest.approx(1.3, abs=1e-6)
    assert weights[ENGAGEMENT].item() == pytest.approx(1.3 * 1e-6 / (3.0 + 1e-6), rel=1e-4)
    assert weights[ENGAGEMENT].item() > 0


def test_gradnorm_skips_a_zero_weight_task() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    balancer = GradNorm({CONVERSION: 1.0, ENGAGEMENT: 0.0})
    assert balancer.weights.shape == (1,)
    total, weights = balancer(linear_losses(w, [3.0, 4.0], [0.0, 1.0]), [w])
    assert total.item() == pytest.approx(11.0, abs=1e-5)  # one task: G equals its target, no GradNorm term
    assert as_floats(weights) == {CONVERSION: 1.0}


def test_gradnorm_task_without_signal_sits_out() -> None:
    # A batch without positives: the sampled softmax returns 0 * (graph), a zero loss and gradient.
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    balancer = GradNorm({CONVERSION: 1.0, ENGAGEMENT: 1.0})
    losses = {CONVERSION: w.sum() * 0.0, ENGAGEMENT: (torch.tensor([0.0, 1.0]) * w).sum()}
    total, _ = balancer(losses, [w])
    total.backward()
    assert total.item() == pytest.approx(2.0, abs=1e-6)  # engagement alone: G = its target
    assert balancer.weights.grad.tolist() == [0.0, 0.0]
    assert math.isnan(balancer.initial_losses[0].item())  # waits for a batch with conversions
    assert balancer.initial_losses[1].item() == 2.0


def test_gradnorm_needs_shared_parameters() -> None:
    with pytest.raises(ValueError, match="shared"):
        GradNorm(WEIGHTS)(LOSSES, [])


def test_gradnorm_initial_losses_are_checkpointed_and_config_buffers_are_not() -> None:
    assert set(GradNorm(WEIGHTS).state_dict()) == {"weights", "initial_losses"}
    assert set(UncertaintyWeighting(WEIGHTS).state_dict()) == {"log_vars"}
    assert StaticWeights(WEIGHTS).state_dict() == {}


# --- task_gradient_cosine ----------------------------------------------------------------------------


def test_gradient_cosine_matches_hand_computation() -> None:
    # L_c = a . (W x + b), L_e = c . (W x + b): gradients (a x^T, a) and (c x^T, c), so the cosine of
    # the flattened, concatenated gradients is cos(a, c) = 1 / sqrt(2) for a = (1, 0), c = (1, 1).
    layer = nn.Linear(2, 2)
    x = torch.tensor([2.0, -1.0])
    out = layer(x)  # (2,)
    losses = {CONVERSION: out[0], ENGAGEMENT: out.sum()}
    cos = task_gradient_cosine(losses, list(layer.parameters()))
    assert cos == {"conversion_vs_engagement": pytest.approx(1 / math.sqrt(2), abs=1e-6)}
    assert GRAD_COSINE_METRIC.format(pair=next(iter(cos))) == "train/grad_cosine/conversion_vs_engagement"

    # The graph is still there: a later backward works and gives the summed gradient.
    (losses[CONVERSION] + losses[ENGAGEMENT]).backward()
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[4.0, -2.0], [2.0, -1.0]]))
    torch.testing.assert_close(layer.bias.grad, torch.tensor([2.0, 1.0]))


def test_gradient_cosine_identical_and_opposite() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    assert task_gradient_cosine(linear_losses(w, [1.0, 2.0], [3.0, 6.0]), [w]) == {
        "conversion_vs_engagement": pytest.approx(1.0, abs=1e-9)
    }
    assert task_gradient_cosine(linear_losses(w, [1.0, 2.0], [-0.5, -1.0]), [w]) == {
        "conversion_vs_engagement": pytest.approx(-1.0, abs=1e-9)
    }


def test_gradient_cosine_leaves_out_undefined_pairs() -> None:
    w, other = nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.ones(2))
    # Engagement does not reach the shared parameter: zero gradient, no cosine.
    assert task_gradient_cosine({CONVERSION: w.sum(), ENGAGEMENT: other.sum()}, [w]) == {}
    # Conversion switched off (not among the losses): nothing to compare with.
    assert task_gradient_cosine({ENGAGEMENT: w.sum()}, [w]) == {}


def test_last_linear_weight_is_the_interaction_output_layer() -> None:
    from convcg_cli.models.cross import ParallelCross, SequentialCross

    parallel = ParallelCross(in_dim=8, out_dim=4, mlp_dims=(16, 8, 8))
    sequential = SequentialCross(in_dim=8, out_dim=4, mlp_dims=(16, 8))
    assert last_linear_weight(parallel) is parallel.proj.weight
    assert last_linear_weight(sequential) is sequential.mlp.net[-1].weight
    with pytest.raises(ValueError, match="no nn.Linear"):
        last_linear_weight(nn.ReLU())


# --- configs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_balancer_config_instantiates_with_the_loss_task_weights(name: str) -> None:
    cfg = OmegaConf.create({"loss": {"task_weights": WEIGHTS}})
    cfg.loss.balancer = OmegaConf.load(CONF_DIR / "loss" / "balancer" / f"{name}.yaml")
    balancer = instantiate(cfg.loss.balancer)
    assert type(balancer) is BALANCERS[name]
    assert balancer.task_weights == WEIGHTS
    if name == "gradnorm":
        assert balancer.alpha == 1.5


def test_every_shipped_balancer_is_covered() -> None:
    shipped = {p.stem for p in (CONF_DIR / "loss" / "balancer").glob("*.yaml")}
    assert shipped == set(BALANCERS)


@pytest.mark.parametrize("ablation", sorted(BALANCER_ABLATIONS))
def test_balancing_ablation_header_says_how_to_run_it(ablation: str) -> None:
    lines = (CONF_DIR / "experiment" / "ablation" / f"{ablation}.yaml").read_text().splitlines()
    assert lines[:2] == ["# @package _global_", f"# convcg train +experiment=ablation/{ablation}"]


@pytest.mark.parametrize(("ablation", "balancer"), sorted(BALANCER_ABLATIONS.items()))
def test_balancing_ablation_composes(ablation: str, balancer: str, tmp_path, monkeypatch) -> None:
    # Compose against a copy of conf/ whose loss config selects a balancer (the `balancer: static`
    # default), so this holds whether or not conf/loss/sampled_softmax.yaml has it yet.
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    loss_yaml = conf / "loss" / "sampled_softmax.yaml"
    text = loss_yaml.read_text()
    if "- balancer:" not in text:
        head, sep, rest = text.partition("defaults:\n")
        entry = "  - balancer: static\n"
        text = head + sep + entry + rest if sep else f"defaults:\n{entry}  - _self_\n{text}"
        loss_yaml.write_text(text)
    monkeypatch.setattr(config, "CONF_DIR", conf)

    assert config.compose("train").choices["loss/balancer"] == "static"
    composed = config.compose(
        "train", [f"+experiment=ablation/{ablation}", "loss.task_weights.engagement=0.5"]
    )
    assert composed.choices["loss/balancer"] == balancer
    built = instantiate(composed.cfg.loss.balancer)
    assert type(built) is BALANCERS[balancer]
    assert built.task_weights == {CONVERSION: 1.0, ENGAGEMENT: 0.5}  # read from loss.task_weights
