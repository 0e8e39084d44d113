"""Cross blocks: each cross network against its formula, pinned outputs on seeded inputs, parameter
counts, every cross network inside both structures, shapes and gradients."""

from functools import partial

import pytest
import torch
from torch import nn

from convcg_cli.models.cross import (
    MLP,
    CrossNet,
    LowRankCrossNet,
    LowRankMixtureCrossNet,
    ParallelCross,
    SequentialCross,
)

# One factory per cross network, small enough to check by hand; rank 2 < D / 2 for D = 6.
CROSS_NETS = {
    "full": partial(CrossNet, num_layers=2),
    "low_rank": partial(LowRankCrossNet, num_layers=2, rank=2),
    "mixture": partial(LowRankMixtureCrossNet, num_layers=2, rank=2, num_experts=3),
}


def _randomise_biases(net: nn.Module) -> None:
    """Biases start at zero; make them non-zero so formula tests exercise the bias term."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.normal_()


def test_crossnet_matches_hand_written_formula() -> None:
    torch.manual_seed(0)
    net = CrossNet(in_dim=4, num_layers=2)
    with torch.no_grad():  # non-zero biases so the bias term is exercised too
        for layer in net.layers:
            layer.bias.normal_()
    x0 = torch.randn(5, 4)
    w0, b0 = net.layers[0].weight, net.layers[0].bias
    w1, b1 = net.layers[1].weight, net.layers[1].bias
    x1 = x0 * (x0 @ w0.T + b0) + x0
    x2 = x0 * (x1 @ w1.T + b1) + x1
    torch.testing.assert_close(net(x0), x2)


def test_crossnet_pinned_output() -> None:
    torch.manual_seed(0)
    net = CrossNet(in_dim=3, num_layers=2)
    out = net(torch.randn(2, 3))
    expected = torch.tensor([[-0.6272, 0.2921, 0.3529], [-1.6816, 3.7706, 0.6927]])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    assert net.out_dim == 3


def test_crossnet_rejects_zero_layers() -> None:
    with pytest.raises(ValueError, match="num_layers"):
        CrossNet(in_dim=3, num_layers=0)


def test_mlp_has_no_activation_after_last_layer() -> None:
    mlp = MLP(in_dim=3, hidden_dims=[4, 2], dropout=0.1)
    kinds = [type(m) for m in mlp.net]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert mlp.out_dim == 2
    with pytest.raises(ValueError):
        MLP(in_dim=3, hidden_dims=[])


def test_sequential_and_parallel_pinned_outputs() -> None:
    torch.manual_seed(0)
    seq = SequentialCross(in_dim=4, out_dim=2, mlp_dims=(3, 3))
    torch.testing.assert_close(
        seq(torch.randn(2, 4)), torch.tensor([[0.2117, -0.4942], [0.0785, -0.5273]]), atol=1e-4, rtol=0
    )
    torch.manual_seed(0)
    par = ParallelCross(in_dim=4, out_dim=2, mlp_dims=(3, 3, 3))
    torch.testing.assert_close(
        par(torch.randn(2, 4)), torch.tensor([[-0.2745, -0.0822], [-1.6992, -0.5557]]), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("cls", [SequentialCross, ParallelCross])
def test_output_shape_and_out_dim(cls: type[nn.Module]) -> None:
    block = cls(in_dim=6, out_dim=5)
    out = block(torch.randn(7, 6))
    assert out.shape == (7, 5)
    assert block.out_dim == 5


def test_sequential_and_parallel_have_different_parameter_shapes() -> None:
    seq = SequentialCross(in_dim=6, out_dim=5, mlp_dims=(8, 4))
    par = ParallelCross(in_dim=6, out_dim=5, mlp_dims=(8, 4, 3))
    seq_shapes = {n: tuple(p.shape) for n, p in seq.named_parameters()}
    par_shapes = {n: tuple(p.shape) for n, p in par.named_parameters()}
    assert seq_shapes != par_shapes
    assert seq_shapes["mlp.net.0.weight"] == (8, 6)  # sequential MLP reads the cross output (6 wide)
    assert seq_shapes["mlp.net.4.weight"] == (5, 4)  # ... and its last layer emits out_dim
    assert par_shapes["proj.weight"] == (5, 6 + 3)  # parallel projects concat(cross, mlp)


@pytest.mark.parametrize(("cls", "mlp_dims"), [(SequentialCross, (8, 4, 2)), (ParallelCross, (8, 4))])
def test_wrong_number_of_mlp_dims_raises(cls: type[nn.Module], mlp_dims: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="mlp_dims"):
        cls(in_dim=6, out_dim=5, mlp_dims=mlp_dims)


@pytest.mark.parametrize("cls", [SequentialCross, ParallelCross])
def test_cross_net_factory_is_used(cls: type[nn.Module]) -> None:
    block = cls(in_dim=6, out_dim=5, cross_net=partial(CrossNet, num_layers=3))
    assert isinstance(block.cross, CrossNet)
    assert len(block.cross.layers) == 3
    assert block(torch.randn(2, 6)).shape == (2, 5)


@pytest.mark.parametrize("cls", [SequentialCross, ParallelCross])
def test_gradient_reaches_every_parameter(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    block = cls(in_dim=6, out_dim=5)
    block(torch.randn(4, 6)).pow(2).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_low_rank_matches_hand_written_formula() -> None:
    torch.manual_seed(0)
    net = LowRankCrossNet(in_dim=5, num_layers=2, rank=2)
    _randomise_biases(net)
    x0 = torch.randn(4, 5)
    x_l = x0
    for v, u in zip(net.down, net.up, strict=True):
        w = u.weight @ v.weight  # (D, D) of rank r: W_l = U_l V_l
        assert torch.linalg.matrix_rank(w) == 2
        x_l = x0 * (x_l @ w.T + u.bias) + x_l
    torch.testing.assert_close(net(x0), x_l)


def test_low_rank_pinned_output() -> None:
    torch.manual_seed(0)
    net = LowRankCrossNet(in_dim=3, num_layers=2, rank=2)
    out = net(torch.randn(2, 3))
    expected = torch.tensor([[-0.2813, 0.7047, 0.6718], [0.6637, -0.9652, 0.4448]])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    assert net.out_dim == 3


def test_mixture_matches_hand_written_formula() -> None:
    # Loops over examples and experts, so this checks the batched einsums and the per-example gate.
    torch.manual_seed(0)
    net = LowRankMixtureCrossNet(in_dim=4, num_layers=2, rank=2, num_experts=3)
    _randomise_biases(net)
    x0 = torch.randn(3, 4)
    rows = []
    for x_0 in x0:  # (D,)
        x_l = x_0
        for layer in net.layers:
            gate = torch.softmax(layer.gate.weight @ x_l, dim=0)  # (K,)
            mixed = torch.zeros(4)
            for i in range(3):
                h = torch.relu(layer.c[i] @ torch.relu(layer.v[i] @ x_l))
                mixed = mixed + gate[i] * x_0 * (layer.u[i] @ h + layer.bias)
            x_l = mixed + x_l
        rows.append(x_l)
    torch.testing.assert_close(net(x0), torch.stack(rows))


def test_mixture_pinned_output() -> None:
    torch.manual_seed(0)
    net = LowRankMixtureCrossNet(in_dim=3, num_layers=2, rank=2, num_experts=2)
    out = net(torch.randn(2, 3))
    expected = torch.tensor([[0.4468, -1.4052, -5.6852], [0.8847, 0.7459, 0.0589]])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    assert net.out_dim == 3


def test_mixture_of_one_linear_expert_is_low_rank_cross() -> None:
    # K = 1: softmax over one expert is 1. With g = identity the expert is x_0 * (U C V x_l + b),
    # i.e. a LowRankCrossNet with U' = U C and V' = V.
    torch.manual_seed(0)
    mix = LowRankMixtureCrossNet(in_dim=5, num_layers=2, rank=2, num_experts=1, activation=nn.Identity())
    _randomise_biases(mix)
    low = LowRankCrossNet(in_dim=5, num_layers=2, rank=2)
    with torch.no_grad():
        for layer, v, u in zip(mix.layers, low.down, low.up, strict=True):
            v.weight.copy_(layer.v[0])
            u.weight.copy_(layer.u[0] @ layer.c[0])
            u.bias.copy_(layer.bias)
    x = torch.randn(4, 5)
    torch.testing.assert_close(mix(x), low(x))


def test_mixture_with_uniform_gate_and_equal_experts_is_one_expert() -> None:
    # A zero gate gives weight 1/K to each expert; K copies of one expert then sum to that expert.
    torch.manual_seed(0)
    one = LowRankMixtureCrossNet(in_dim=5, num_layers=2, rank=2, num_experts=1)
    three = LowRankMixtureCrossNet(in_dim=5, num_layers=2, rank=2, num_experts=3)
    _randomise_biases(one)
    with torch.no_grad():
        for a, b in zip(one.layers, three.layers, strict=True):
            for name in ("v", "c", "u"):
                getattr(b, name).copy_(getattr(a, name).expand_as(getattr(b, name)))
            b.bias.copy_(a.bias)
            b.gate.weight.zero_()
    x = torch.randn(4, 5)
    torch.testing.assert_close(three(x), one(x))


def test_parameter_counts_per_layer() -> None:
    d, r, k, layers = 12, 3, 4, 2

    def count(net: nn.Module) -> int:
        return sum(p.numel() for p in net.parameters())

    assert count(CrossNet(d, layers)) == layers * (d * d + d)
    assert count(LowRankCrossNet(d, layers, rank=r)) == layers * (2 * d * r + d)
    # per expert U, V and C; one shared bias and a K x D gate per layer.
    mixture = LowRankMixtureCrossNet(d, layers, rank=r, num_experts=k)
    assert count(mixture) == layers * (k * (2 * d * r + r * r) + d + k * d)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (partial(LowRankCrossNet, num_layers=0, rank=2), "num_layers"),
        (partial(LowRankCrossNet, num_layers=2, rank=0), "rank"),
        (partial(LowRankMixtureCrossNet, num_layers=0, rank=2, num_experts=2), "num_layers"),
        (partial(LowRankMixtureCrossNet, num_layers=2, rank=0, num_experts=2), "rank"),
        (partial(LowRankMixtureCrossNet, num_layers=2, rank=2, num_experts=0), "num_experts"),
    ],
)
def test_low_rank_nets_reject_bad_sizes(factory: partial, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory(4)


@pytest.mark.parametrize("cls", [SequentialCross, ParallelCross])
@pytest.mark.parametrize("name", sorted(CROSS_NETS))
def test_every_cross_net_fits_both_structures(cls: type[nn.Module], name: str) -> None:
    torch.manual_seed(0)
    block = cls(in_dim=6, out_dim=5, cross_net=CROSS_NETS[name])
    assert block.cross.out_dim == 6  # width-preserving: the MLP/projection is sized from in_dim
    out = block(torch.randn(4, 6))
    assert out.shape == (4, 5)
    out.pow(2).sum().backward()
    for pname, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize(
    ("name", "seq_expected", "par_expected"),
    [
        ("low_rank", [[0.0839, 0.3048], [0.0735, 0.2954]], [[0.0877, -0.1502], [-0.1527, -0.6142]]),
        ("mixture", [[0.1180, -0.3376], [0.0516, -0.2464]], [[0.1817, 0.4773], [-0.0843, 0.5404]]),
    ],
)
def test_structures_with_low_rank_nets_pinned_outputs(
    name: str, seq_expected: list[list[float]], par_expected: list[list[float]]
) -> None:
    factory = {
        "low_rank": partial(LowRankCrossNet, num_layers=2, rank=2),
        "mixture": partial(LowRankMixtureCrossNet, num_layers=2, rank=2, num_experts=2),
    }[name]
    torch.manual_seed(0)
    seq = SequentialCross(in_dim=4, out_dim=2, mlp_dims=(8, 8), cross_net=factory)
    torch.testing.assert_close(seq(torch.randn(2, 4)), torch.tensor(seq_expected), atol=1e-4, rtol=0)
    torch.manual_seed(0)
    par = ParallelCross(in_dim=4, out_dim=2, mlp_dims=(8, 8, 8), cross_net=factory)
    torch.testing.assert_close(par(torch.randn(2, 4)), torch.tensor(par_expected), atol=1e-4, rtol=0)
