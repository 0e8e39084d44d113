"""Feature-interaction blocks of a tower: the DCNv2 cross network, a plain MLP, and two ways to combine them.

One class per variant, chosen by config (``conf/model/cross/``):

* ``SequentialCross``: cross network, then an MLP on its output (DCNv2 "stacked").
* ``ParallelCross``: cross network and MLP both read the input; their outputs are concatenated and
  projected (DCNv2 "parallel").

Both take the cross network as a factory, so a low-rank or mixture-of-experts cross network can be
swapped in later without touching them.
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn

# A factory ``in_dim -> module`` mapping (B, in_dim) -> (B, in_dim), e.g. ``partial(CrossNet, num_layers=3)``.
CrossNetFactory = Callable[[int], nn.Module]


class CrossNet(nn.Module):
    r"""Full-rank cross network of DCNv2 (Wang et al., 2021, https://arxiv.org/abs/2008.13535).

    Each layer ``l`` maps ``(B, D) -> (B, D)``:

    .. math::    x_{l+1} = x_0 * (W_l x_l + b_l) + x_l

    where ``W_l`` is a full ``D x D`` matrix and ``*`` is element-wise. ``L`` layers model feature
    crosses up to degree ``L + 1``; the residual ``+ x_l`` keeps lower degrees.

    Args:
        in_dim: width ``D`` of the input (and of the output).
        num_layers: number of cross layers, at least 1.

    Example:
        >>> net = CrossNet(in_dim=8, num_layers=2)
        >>> net(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, in_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"CrossNet needs num_layers >= 1, got {num_layers}.")
        self.in_dim = in_dim
        self.out_dim = in_dim
        # nn.Linear computes x W^T + b, i.e. W x_l + b_l for each row x_l.
        layers = [nn.Linear(in_dim, in_dim) for _ in range(num_layers)]
        for layer in layers:
            # Same init as torchrec's CrossNet: xavier-normal kernels, zero bias, so a fresh layer
            # starts near x_0 * W x_l + x_l rather than with a random offset.
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, D) -> (B, D)."""
        x_0 = x  # (B, D)
        x_l = x  # (B, D)
        for layer in self.layers:
            x_l = x_0 * layer(x_l) + x_l  # (B, D)
        return x_l


class MLP(nn.Module):
    """Stack of Linear layers with ReLU (and Dropout) between them and no activation after the last.

    The last layer is left linear so the block can feed a projection, a head or a concatenation
    without clipping its output at zero; callers that need an activated output apply it themselves.

    Args:
        in_dim: width of the input.
        hidden_dims: output width of each Linear layer, in order; at least one entry.
        dropout: dropout probability applied after each hidden ReLU (not after the last layer).

    Example:
        >>> mlp = MLP(in_dim=8, hidden_dims=[16, 4])
        >>> mlp(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        dims = [int(d) for d in hidden_dims]
        if not dims:
            raise ValueError("MLP needs at least one entry in hidden_dims.")
        blocks: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip([in_dim, *dims[:-1]], dims, strict=True)):
            blocks.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 1:
                blocks.append(nn.ReLU())
                if dropout > 0:
                    blocks.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*blocks)
        self.in_dim = in_dim
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in_dim) -> (B, out_dim)."""
        return self.net(x)


def _build_cross_net(in_dim: int, cross_layers: int, cross_net: CrossNetFactory | None) -> nn.Module:
    """Return ``cross_net(in_dim)`` if a factory is given, else the default full-rank ``CrossNet``."""
    if cross_net is None:
        return CrossNet(in_dim, cross_layers)
    return cross_net(in_dim)


def _check_num_dims(cls_name: str, mlp_dims: Sequence[int], expected: int) -> list[int]:
    dims = [int(d) for d in mlp_dims]
    if len(dims) != expected:
        raise ValueError(f"{cls_name} needs exactly {expected} mlp_dims, got {dims}.")
    return dims


class SequentialCross(nn.Module):
    """Cross network followed by a 3-layer MLP: ``x -> cross(x) -> MLP([*mlp_dims, out_dim])``.

    Args:
        in_dim: width of the input (the concatenated feature embeddings).
        out_dim: width of the output, read by the head.
        cross_layers: number of layers of the default ``CrossNet``; ignored when ``cross_net`` is given.
        mlp_dims: widths of the first two MLP layers (2 entries); the third layer outputs ``out_dim``.
        dropout: dropout after each hidden ReLU of the MLP.
        cross_net: optional factory ``in_dim -> module`` building the cross network, which must map
            (B, in_dim) -> (B, in_dim). Defaults to ``CrossNet(in_dim, cross_layers)``.

    Example:
        >>> block = SequentialCross(in_dim=8, out_dim=4, mlp_dims=(16, 8))
        >>> block(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        cross_layers: int = 2,
        mlp_dims: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        cross_net: CrossNetFactory | None = None,
    ) -> None:
        super().__init__()
        dims = _check_num_dims("SequentialCross", mlp_dims, expected=2)
        self.cross = _build_cross_net(in_dim, cross_layers, cross_net)
        self.mlp = MLP(in_dim, [*dims, out_dim], dropout=dropout)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in_dim) -> (B, out_dim)."""
        crossed = self.cross(x)  # (B, in_dim)
        return self.mlp(crossed)  # (B, out_dim)


class ParallelCross(nn.Module):
    """Cross network and a 3-layer MLP side by side on the same input, concatenated, then projected.

    ``out = Linear(concat(cross(x), relu(MLP(x))))``. The MLP's last layer is a hidden layer here
    (the projection follows it), so its output is passed through ReLU before the concatenation;
    otherwise it would collapse into the projection as two back-to-back linear maps.

    Args:
        in_dim: width of the input (the concatenated feature embeddings).
        out_dim: width of the output, read by the head.
        cross_layers: number of layers of the default ``CrossNet``; ignored when ``cross_net`` is given.
        mlp_dims: widths of the three MLP layers (3 entries).
        dropout: dropout after each hidden ReLU of the MLP.
        cross_net: optional factory ``in_dim -> module`` building the cross network, which must map
            (B, in_dim) -> (B, in_dim). Defaults to ``CrossNet(in_dim, cross_layers)``.

    Example:
        >>> block = ParallelCross(in_dim=8, out_dim=4, mlp_dims=(16, 8, 8))
        >>> block(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        cross_layers: int = 2,
        mlp_dims: Sequence[int] = (256, 128, 64),
        dropout: float = 0.0,
        cross_net: CrossNetFactory | None = None,
    ) -> None:
        super().__init__()
        dims = _check_num_dims("ParallelCross", mlp_dims, expected=3)
        self.cross = _build_cross_net(in_dim, cross_layers, cross_net)
        self.mlp = MLP(in_dim, dims, dropout=dropout)
        self.proj = nn.Linear(in_dim + dims[-1], out_dim)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in_dim) -> (B, out_dim)."""
        crossed = self.cross(x)  # (B, in_dim)
        deep = torch.relu(self.mlp(x))  # (B, mlp_dims[-1])
        both = torch.cat([crossed, deep], dim=-1)  # (B, in_dim + mlp_dims[-1])
        return self.proj(both)  # (B, out_dim)
