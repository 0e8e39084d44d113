"""Feature-interaction blocks of a tower: the DCNv2 cross network, a plain MLP, and two ways to combine them.

One class per variant, chosen by config. The cross network (``conf/model/cross/cross_net/``):

* ``CrossNet``: full-rank, ``W_l`` is ``D x D`` (``full``).
* ``LowRankCrossNet``: ``W_l = U_l V_l`` of rank ``r`` (``low_rank``).
* ``LowRankMixtureCrossNet``: ``K`` low-rank experts per layer, mixed by a per-example softmax gate
  (``mixture``).

and the structure around it (``conf/model/cross/``):

* ``SequentialCross``: cross network, then an MLP on its output (DCNv2 "stacked").
* ``ParallelCross``: cross network and MLP both read the input; their outputs are concatenated and
  projected (DCNv2 "parallel").

Both structures take the cross network as a factory ``in_dim -> module``, so any cross network
that maps (B, D) -> (B, D) fits either structure.
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn

# A factory ``in_dim -> module`` mapping (B, in_dim) -> (B, in_dim), e.g. ``partial(CrossNet, num_layers=3)``.
CrossNetFactory = Callable[[int], nn.Module]

# The cross network a block builds when no ``cross_net`` factory is given (tests, docstring examples).
DEFAULT_CROSS_LAYERS = 2


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
        self.num_layers = num_layers
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


class LowRankCrossNet(nn.Module):
    r"""Low-rank cross network of DCNv2: each layer's ``W_l`` is factored as ``U_l V_l``.

    Each layer ``l`` maps ``(B, D) -> (B, D)``:

    .. math::    x_{l+1} = x_0 * (U_l (V_l x_l) + b_l) + x_l

    with ``V_l`` of shape ``r x D`` (no bias) and ``U_l`` of shape ``D x r`` (with bias ``b_l``).
    A layer has ``2 D r + D`` parameters instead of ``D^2 + D``, so it is cheaper whenever
    ``r < D / 2``; the DCNv2 paper finds ``r`` around ``D / 4`` keeps the full-rank accuracy.

    Args:
        in_dim: width ``D`` of the input (and of the output).
        num_layers: number of cross layers, at least 1.
        rank: rank ``r`` of each layer's cross matrix, at least 1.

    Example:
        >>> net = LowRankCrossNet(in_dim=8, num_layers=2, rank=2)
        >>> net(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, in_dim: int, num_layers: int, rank: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"LowRankCrossNet needs num_layers >= 1, got {num_layers}.")
        if rank < 1:
            raise ValueError(f"LowRankCrossNet needs rank >= 1, got {rank}.")
        self.in_dim = in_dim
        self.out_dim = in_dim
        self.num_layers = num_layers
        self.rank = rank
        down = [nn.Linear(in_dim, rank, bias=False) for _ in range(num_layers)]  # V_l
        up = [nn.Linear(rank, in_dim) for _ in range(num_layers)]  # U_l, b_l
        for v, u in zip(down, up, strict=True):
            # Same init as CrossNet (and torchrec): xavier-normal kernels, zero bias.
            nn.init.xavier_normal_(v.weight)
            nn.init.xavier_normal_(u.weight)
            nn.init.zeros_(u.bias)
        self.down = nn.ModuleList(down)
        self.up = nn.ModuleList(up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, D) -> (B, D)."""
        x_0 = x  # (B, D)
        x_l = x  # (B, D)
        for v, u in zip(self.down, self.up, strict=True):
            x_l = x_0 * u(v(x_l)) + x_l  # (B, r) inside, (B, D) out
        return x_l


class _MixtureCrossLayer(nn.Module):
    """One layer of ``LowRankMixtureCrossNet``: K low-rank experts, a shared bias and a softmax gate."""

    def __init__(
        self,
        in_dim: int,
        rank: int,
        num_experts: int,
        activation: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.empty(num_experts, rank, in_dim))  # V_i: D -> r
        self.c = nn.Parameter(torch.empty(num_experts, rank, rank))  # C_i: r -> r
        self.u = nn.Parameter(torch.empty(num_experts, in_dim, rank))  # U_i: r -> D
        self.bias = nn.Parameter(torch.zeros(in_dim))  # b, shared by the experts as in torchrec
        self.gate = nn.Linear(in_dim, num_experts, bias=False)  # G
        # Xavier per expert matrix: on a (K, n, m) tensor torch would count K into the fans.
        for kernel in (self.v, self.c, self.u):
            for k in range(num_experts):
                nn.init.xavier_normal_(kernel.data[k])
        self.activation = activation

    def forward(self, x_0: torch.Tensor, x_l: torch.Tensor) -> torch.Tensor:
        """Map x_0, x_l (B, D) -> x_{l+1} (B, D)."""
        g = self.activation
        h = g(torch.einsum("bd,krd->bkr", x_l, self.v))  # (B, K, r)
        h = g(torch.einsum("bkr,kqr->bkq", h, self.c))  # (B, K, r)
        h = torch.einsum("bkr,kdr->bkd", h, self.u)  # (B, K, D)
        experts = x_0.unsqueeze(1) * (h + self.bias)  # (B, K, D)
        gate = torch.softmax(self.gate(x_l), dim=-1)  # (B, K), per example
        return torch.einsum("bk,bkd->bd", gate, experts) + x_l  # (B, D)


class LowRankMixtureCrossNet(nn.Module):
    r"""Mixture of low-rank cross experts ("DCN-Mix" of DCNv2, as torchrec's LowRankMixtureCrossNet).

    Each layer ``l`` maps ``(B, D) -> (B, D)`` with ``K`` experts that each learn crosses in their
    own rank-``r`` subspace, combined by a gate that depends on the example:

    .. math::    E_i(x_l) = x_0 * (U_i\, g(C_i\, g(V_i x_l)) + b_l)

    .. math::    x_{l+1} = \sum_i \mathrm{softmax}(G x_l)_i \, E_i(x_l) + x_l

    with ``V_i`` ``r x D``, ``C_i`` ``r x r``, ``U_i`` ``D x r`` (per layer and expert), ``b_l`` shared by
    the experts, ``G`` ``K x D`` without bias, and ``g`` a non-linearity. With ``num_experts=1`` the
    gate is the constant 1 (its weights get no gradient); use ``LowRankCrossNet`` for a single expert.

    Args:
        in_dim: width ``D`` of the input (and of the output).
        num_layers: number of cross layers, at least 1.
        rank: rank ``r`` of each expert, at least 1.
        num_experts: number of experts ``K`` per layer, at least 1.
        activation: the non-linearity ``g`` inside each expert (default ReLU). A module (e.g. from a
            Hydra ``_target_: torch.nn.ReLU`` node) or a plain function.

    Example:
        >>> net = LowRankMixtureCrossNet(in_dim=8, num_layers=2, rank=2, num_experts=3)
        >>> net(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(
        self,
        in_dim: int,
        num_layers: int,
        rank: int,
        num_experts: int,
        activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"LowRankMixtureCrossNet needs num_layers >= 1, got {num_layers}.")
        if rank < 1:
            raise ValueError(f"LowRankMixtureCrossNet needs rank >= 1, got {rank}.")
        if num_experts < 1:
            raise ValueError(f"LowRankMixtureCrossNet needs num_experts >= 1, got {num_experts}.")
        self.in_dim = in_dim
        self.out_dim = in_dim
        self.num_layers = num_layers
        self.rank = rank
        self.num_experts = num_experts
        self.layers = nn.ModuleList(
            _MixtureCrossLayer(in_dim, rank, num_experts, activation) for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, D) -> (B, D)."""
        x_0 = x  # (B, D)
        x_l = x  # (B, D)
        for layer in self.layers:
            x_l = layer(x_0, x_l)  # (B, D)
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


def _build_cross_net(in_dim: int, cross_net: CrossNetFactory | None) -> nn.Module:
    """``cross_net(in_dim)``, or a ``CrossNet`` of ``DEFAULT_CROSS_LAYERS`` layers without a factory."""
    return CrossNet(in_dim, DEFAULT_CROSS_LAYERS) if cross_net is None else cross_net(in_dim)


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
        mlp_dims: widths of the first two MLP layers (2 entries); the third layer outputs ``out_dim``.
        dropout: dropout after each hidden ReLU of the MLP.
        cross_net: optional factory ``in_dim -> module`` building the cross network, which must map
            (B, in_dim) -> (B, in_dim), e.g. ``partial(LowRankCrossNet, num_layers=2, rank=16)``.
            Defaults to ``CrossNet(in_dim, DEFAULT_CROSS_LAYERS)``.

    Example:
        >>> block = SequentialCross(in_dim=8, out_dim=4, mlp_dims=(16, 8))
        >>> block(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        mlp_dims: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        cross_net: CrossNetFactory | None = None,
    ) -> None:
        super().__init__()
        dims = _check_num_dims("SequentialCross", mlp_dims, expected=2)
        self.cross = _build_cross_net(in_dim, cross_net)
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
        mlp_dims: widths of the three MLP layers (3 entries).
        dropout: dropout after each hidden ReLU of the MLP.
        cross_net: optional factory ``in_dim -> module`` building the cross network, which must map
            (B, in_dim) -> (B, in_dim), e.g. ``partial(LowRankCrossNet, num_layers=2, rank=16)``.
            Defaults to ``CrossNet(in_dim, DEFAULT_CROSS_LAYERS)``.

    Example:
        >>> block = ParallelCross(in_dim=8, out_dim=4, mlp_dims=(16, 8, 8))
        >>> block(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        mlp_dims: Sequence[int] = (256, 128, 64),
        dropout: float = 0.0,
        cross_net: CrossNetFactory | None = None,
    ) -> None:
        super().__init__()
        dims = _check_num_dims("ParallelCross", mlp_dims, expected=3)
        self.cross = _build_cross_net(in_dim, cross_net)
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
