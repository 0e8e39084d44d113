"""A tower: feature embeddings -> interaction block -> head. The user and item towers are both ``Tower``.

The interaction block and the head are passed in as *factories* taking ``in_dim`` as their first
positional argument, because their input width is only known once the feature embedder is built.
With Hydra these are ``_partial_: true`` configs, e.g.::

    interaction = functools.partial(ParallelCross, out_dim=128, cross_layers=2)
    head = functools.partial(UnifiedHead, embedding_dim=64, tasks=["conversion", "engagement"])
    tower = Tower(spec, interaction=interaction, head=head)   # calls interaction(in_dim), head(out_dim)
"""

from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import torch
from torch import nn

from convcg_cli.specs import FeatureSpec  # re-exported: the spec moved to a leaf shared with data


class Interaction(Protocol):
    """What ``Tower`` needs from its interaction block: a (B, in_dim) -> (B, out_dim) callable."""

    out_dim: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class EmbeddingHead(Protocol):
    """What ``Tower`` needs from its head (``UnifiedHead``, ``MultiHead``)."""

    def __call__(self, h: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def serve(self, h: torch.Tensor) -> torch.Tensor: ...


class FeatureEmbedder(nn.Module):
    """Embed categorical features and concatenate them with the numeric ones, encoded sequences and
    linearly projected vectors (each vector feature to ``embedding_dim``).

    Features are read in sorted name order (categorical first, then numeric, sequences, vectors) so the
    layout of the output does not depend on dict order. Keys of ``features`` not in the spec are
    ignored (a batch carries ids and labels too). Categorical indices are not range-checked here; the
    data contract (``data_schemas/``) guarantees ``0 <= index < cardinality``.

    Args:
        spec: the features to read.
        embedding_dim: embedding width of every categorical feature without an override.
        embedding_dims: optional per-feature width overrides, keyed by categorical feature name.
        sequence_encoder: factory called as ``sequence_encoder(vocab)`` for each sequence feature of
            the spec; returns a module with ``out_dim`` mapping (items (B, L), actions (B, L)) ->
            (B, out_dim), e.g. ``partial(HistoryEncoder, dim=32, max_len=20)``. Required iff the
            spec has sequences; ignored otherwise.

    Example:
        >>> emb = FeatureEmbedder(FeatureSpec({"country": 10}, ("price",)), embedding_dim=4)
        >>> emb({"country": torch.tensor([0, 3]), "price": torch.tensor([0.5, -1.0])}).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        spec: FeatureSpec,
        embedding_dim: int = 16,
        embedding_dims: Mapping[str, int] | None = None,
        sequence_encoder: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        overrides = {str(k): int(v) for k, v in dict(embedding_dims or {}).items()}
        unknown = sorted(set(overrides) - set(spec.categorical))
        if unknown:
            raise ValueError(
                f"embedding_dims names {unknown}, which are not categorical features of this tower "
                f"({sorted(spec.categorical)})."
            )
        self.spec = spec
        self.categorical_names = tuple(sorted(spec.categorical))
        self.numeric_names = tuple(sorted(spec.numeric))
        dims = {name: overrides.get(name, embedding_dim) for name in self.categorical_names}
        self.embeddings = nn.ModuleDict(
            {name: nn.Embedding(spec.categorical[name], dim) for name, dim in dims.items()}
        )
        self.sequence_names = tuple(sorted(spec.sequences))
        encoders: dict[str, nn.Module] = {}
        if self.sequence_names:
            if sequence_encoder is None:
                raise ValueError(
                    f"The features include sequence(s) {list(self.sequence_names)} but no sequence_encoder "
                    f"factory was given to encode them (e.g. partial(HistoryEncoder, dim=32, max_len=20))."
                )
            encoders = {name: sequence_encoder(spec.sequences[name]) for name in self.sequence_names}
        self.sequence_encoders = nn.ModuleDict(encoders)
        # Built last, and only for vector features: a spec without them draws no extra random numbers,
        # so its towers initialise exactly as before vectors existed.
        self.vector_names = tuple(sorted(spec.vectors))
        self.vector_projections = nn.ModuleDict(
            {name: nn.Linear(spec.vectors[name], embedding_dim) for name in self.vector_names}
        )
        self.out_dim = (
            sum(dims.values())
            + len(self.numeric_names)
            + sum(int(cast(Any, enc).out_dim) for enc in self.sequence_encoders.values())
            + embedding_dim * len(self.vector_names)
        )

    def _input_names(self) -> tuple[str, ...]:
        actions = tuple(f"{name}_actions" for name in self.sequence_names)
        return (
            *self.categorical_names,
            *self.numeric_names,
            *self.sequence_names,
            *actions,
            *self.vector_names,
        )

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Map {name: (B,)} (and (B, L) for sequences, (B, length) for vectors) -> (B, out_dim);
        categorical int64, numeric and vectors float."""
        missing = [n for n in self._input_names() if n not in features]
        if missing:
            raise KeyError(f"Tower input is missing feature(s) {missing}; got {sorted(features)}.")
        parts = [self.embeddings[name](features[name]) for name in self.categorical_names]  # (B, d_i)
        parts += [features[name].unsqueeze(-1) for name in self.numeric_names]  # (B, 1)
        parts += [
            self.sequence_encoders[name](features[name], features[f"{name}_actions"])  # (B, d_seq)
            for name in self.sequence_names
        ]
        parts += [self.vector_projections[name](features[name]) for name in self.vector_names]  # (B, d)
        return torch.cat(parts, dim=-1)  # (B, out_dim)


class Tower(nn.Module):
    """One side of the two-tower model: ``FeatureEmbedder -> interaction -> head``.

    Args:
        spec: the features this tower reads.
        interaction: factory called as ``interaction(in_dim)``; returns a module with attribute
            ``out_dim`` mapping (B, in_dim) -> (B, out_dim), e.g. ``partial(ParallelCross, out_dim=128)``.
        head: factory called as ``head(interaction.out_dim)``; returns a module with ``forward(h) ->
            {task: (B, E)}`` and ``serve(h) -> (B, E)``, e.g. ``partial(UnifiedHead, embedding_dim=64,
            tasks=[...])``.
        embedding_dim: default width of categorical embeddings.
        embedding_dims: optional per-feature embedding widths.
        sequence_encoder: factory for the spec's sequence features (see ``FeatureEmbedder``).

    Example:
        >>> from functools import partial
        >>> from convcg_cli.models.cross import SequentialCross
        >>> from convcg_cli.models.heads import UnifiedHead
        >>> tower = Tower(
        ...     FeatureSpec({"country": 10}, ("price",)),
        ...     interaction=partial(SequentialCross, out_dim=8, mlp_dims=(16, 16)),
        ...     head=partial(UnifiedHead, embedding_dim=4, tasks=["conversion"]),
        ... )
        >>> tower.serve({"country": torch.tensor([1, 2]), "price": torch.tensor([0.1, 0.2])}).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        spec: FeatureSpec,
        interaction: Callable[[int], nn.Module],
        head: Callable[[int], nn.Module],
        embedding_dim: int = 16,
        embedding_dims: Mapping[str, int] | None = None,
        sequence_encoder: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.embedder = FeatureEmbedder(
            spec,
            embedding_dim=embedding_dim,
            embedding_dims=embedding_dims,
            sequence_encoder=sequence_encoder,
        )
        # nn.Modules at runtime (so assigning registers their parameters); the casts tell the type
        # checker which parts of them the tower relies on.
        self.interaction = cast(Interaction, interaction(self.embedder.out_dim))
        self.head = cast(EmbeddingHead, head(self.interaction.out_dim))

    def _hidden(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = self.embedder(features)  # (B, in_dim)
        return self.interaction(x)  # (B, interaction.out_dim)

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training embeddings: {task: (B, E)}."""
        return self.head(self._hidden(features))

    def serve(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The retrieval embedding (B, E)."""
        return self.head.serve(self._hidden(features))
