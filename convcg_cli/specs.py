"""Shared specs: what the data layer hands the model layer, in a leaf both import.

``FeatureSpec`` describes one tower's inputs; ``convcg_cli.data.features.encodings`` builds it from the tables
and ``convcg_cli.models.towers`` builds embeddings from it. It lives here so that ``data`` never
imports ``models`` (``convcg_cli.models.towers`` re-exports it).
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FeatureSpec:
    """The input features of one tower.

    Args:
        categorical: feature name -> cardinality. Index 0 is reserved for missing/unknown values, so
            valid indices are ``0 .. cardinality - 1``.
        numeric: names of already-normalised float features, fed to the tower as they are.
        sequences: sequence feature name -> item vocabulary size (number of items + 1; code 0 is
            padding). A batch carries ``<name>`` (B, L) item codes and ``<name>_actions`` (B, L)
            action codes; ``FeatureEmbedder`` encodes them with its ``sequence_encoder`` factory.
        vectors: vector feature name -> length: a batch carries ``<name>`` (B, length) floats (e.g. a
            content embedding), which ``FeatureEmbedder`` projects with a linear layer.

    Example:
        >>> spec = FeatureSpec(categorical={"country": 10}, numeric=("price",), sequences={"history": 21})
        >>> spec.sequences
        {'history': 21}
    """

    categorical: dict[str, int]
    numeric: tuple[str, ...] = ()
    sequences: dict[str, int] = field(default_factory=dict)
    vectors: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalise containers (configs hand us DictConfig/ListConfig) so equality and saving are plain.
        categorical = {str(k): int(v) for k, v in dict(self.categorical).items()}
        numeric = tuple(str(n) for n in self.numeric)
        sequences = {str(k): int(v) for k, v in dict(self.sequences).items()}
        bad = {k: v for k, v in categorical.items() if v < 1}
        if bad:
            raise ValueError(f"Categorical cardinalities must be >= 1 (index 0 is 'missing'), got {bad}.")
        vectors = {str(k): int(v) for k, v in dict(self.vectors).items()}
        bad = {k: v for k, v in vectors.items() if v < 1}
        if bad:
            raise ValueError(f"Vector lengths must be >= 1, got {bad}.")
        bad = {k: v for k, v in sequences.items() if v < 2}
        if bad:
            raise ValueError(f"Sequence vocabulary sizes must be >= 2 (code 0 is padding), got {bad}.")
        if len(set(numeric)) != len(numeric):
            raise ValueError(f"Duplicate numeric feature names in {list(numeric)}.")
        both = sorted(set(categorical) & set(numeric))
        if both:
            raise ValueError(f"Features {both} are listed as both categorical and numeric.")
        # A sequence feature reads two batch keys; neither may be another feature's name.
        sequence_keys = set(sequences) | {f"{name}_actions" for name in sequences}
        clash = sorted(sequence_keys & (set(categorical) | set(numeric)))
        if clash:
            raise ValueError(f"Batch keys {clash} of sequence features clash with other features.")
        clash = sorted(set(vectors) & (set(categorical) | set(numeric) | sequence_keys))
        if clash:
            raise ValueError(f"Vector features {clash} clash with other features.")
        if not categorical and not numeric and not sequences and not vectors:
            raise ValueError("A FeatureSpec needs at least one feature.")
        object.__setattr__(self, "categorical", categorical)
        object.__setattr__(self, "numeric", numeric)
        object.__setattr__(self, "sequences", sequences)
        object.__setattr__(self, "vectors", vectors)
