"""The importer's user key: a user id column, optionally with a fallback column (user id, else session
id), mapped to the contract's integer ``user_id``.

``impressions.user`` in a mapping is a column name (integer ids, kept as they are) or a block::

    user: {column: customer_id, fallback: session_id, null_values: ["0"], encode: true}

With a ``fallback`` (or ``encode: true``, for text ids) each row's key is the text
``<column>:<value>`` of the first non-null column, e.g. ``customer_id:17`` or ``session_id:a9f3``
(so a customer 17 and a session "17" stay two users), and ``user_id`` is the key's rank among the
distinct keys sorted as text, from 0: deterministic, whatever the row order. The users table keeps
the key in its ``user_key`` column, the way back to the source ids. ``null_values`` are ids that mean
"unknown" (e.g. 0 for logged-out users) and fall through to the fallback.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

from convcg_cli.errors import ConfigError, ConvcgError

USER_KEY = "user_key"  # users table column holding the source key of an encoded user id
_KEYS = ("column", "fallback", "null_values", "encode")


@dataclass(frozen=True)
class UserKeySpec:
    """Where a log's user comes from (see the module docstring)."""

    column: str
    fallback: str | None = None
    null_values: tuple[str, ...] = ()
    encode: bool = False

    @classmethod
    def from_mapping(cls, spec: Any) -> UserKeySpec:
        """From ``impressions.user``: a column name or a ``{column, fallback, null_values, encode}`` block."""
        if isinstance(spec, str):
            return cls(spec)
        if not isinstance(spec, Mapping) or "column" not in spec or set(spec) - set(_KEYS):
            raise ConfigError(
                f"impressions.user must be a column name or a block with keys {list(_KEYS)}, got {spec!r}."
            )
        return cls(
            column=str(spec["column"]),
            fallback=spec.get("fallback"),
            null_values=tuple(str(v) for v in spec.get("null_values") or ()),
            encode=bool(spec.get("encode", False)),
        )

    @property
    def encoded(self) -> bool:
        """Whether ids are mapped to integers through the key text (a fallback, or ``encode``)."""
        return self.fallback is not None or self.encode

    @property
    def columns(self) -> list[str]:
        """The log columns the key reads."""
        return [self.column, *([self.fallback] if self.fallback else [])]

    def known(self, column: str) -> pl.Expr:
        """``column`` as text, null where it holds one of ``null_values``."""
        text = pl.col(column).cast(pl.String)
        return pl.when(text.is_in(list(self.null_values))).then(None).otherwise(text)

    def key_text(self) -> pl.Expr:
        """The key of a log row: ``<column>:<value>`` of the first known column (null if none)."""
        parts = [pl.lit(f"{c}:") + self.known(c) for c in self.columns]
        return pl.coalesce(parts).alias(USER_KEY)


def assign_user_ids(log: pl.DataFrame, spec: UserKeySpec) -> tuple[pl.Series, pl.DataFrame]:
    """Integer user id of every log row, and the distinct users (``user_id`` [, ``user_key``]).

    Raises:
        ConvcgError: rows with no known user (every key column null or a ``null_values`` value).
    """
    if not spec.encoded:
        ids = log[spec.column].cast(pl.Int64).alias("user_id")
        return ids, ids.unique().sort().to_frame()
    keys = log.select(spec.key_text())[USER_KEY]
    if keys.null_count():
        sample = log.filter(keys.is_null()).select(spec.columns).head(3).rows()
        raise ConvcgError(
            f"{keys.null_count():,} of {log.height:,} impressions have no user: {' and '.join(spec.columns)} "
            f"are both unknown (e.g. {sample}); fill them or drop those rows before importing."
        )
    distinct = keys.unique().sort()
    table = pl.DataFrame(
        {"user_id": pl.int_range(0, len(distinct), eager=True, dtype=pl.Int64), USER_KEY: distinct}
    )
    ids = keys.to_frame().join(table, on=USER_KEY, how="left", maintain_order="left")["user_id"]
    return ids, table


def encode_known_users(
    frame: pl.DataFrame, column: str, users: pl.DataFrame, spec: UserKeySpec
) -> tuple[pl.DataFrame, int]:
    """A users or user-history table whose ``column`` holds ids of ``spec.column``, with ``column``
    replaced by the integer ``user_id`` of ``users``; rows of users absent from the log are dropped
    and counted (they can never be served)."""
    keyed = frame.with_columns((pl.lit(f"{spec.column}:") + spec.known(column)).alias(USER_KEY))
    codes = users.select(pl.col("user_id").alias("_code"), USER_KEY)
    joined = keyed.join(codes, on=USER_KEY, how="inner", maintain_order="left")
    out = joined.with_columns(pl.col("_code").alias(column)).drop("_code", USER_KEY)
    return out, frame.height - out.height
