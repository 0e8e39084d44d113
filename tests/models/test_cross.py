"""Cross blocks: CrossNet against its formula, pinned outputs on seeded inputs, shapes and gradients."""

from functools import partial

import pytest
import torch
from torch import nn

from convcg_cli.models.cross import MLP, CrossNet, ParallelCross, SequentialCross


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
