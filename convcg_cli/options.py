"""The numeric options a user can set, their type and allowed range, checked once after compose.

One declarative table (``NUMERIC_OPTIONS``) and one function (:func:`check_numeric_options`): a bad
value is a ConfigError naming the key, the value and the range, raised before any data is read or
any MLflow run is created. Keys absent from a config (eval has no ``trainer``) are skipped, so the
same table serves ``train``, ``eval``, ``ablate`` and ``bench``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from convcg_cli.errors import ConfigError

# Below this the softmax logits (cosine / temperature) overflow float32 exp: 1 / 1e-4 = 1e4.
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class NumericOption:
    """One numeric option: its dotted key (``*`` matches every key of a mapping, ``[]`` every item of
    a list), whether it is an integer, and its bounds.

    Example: ``NumericOption("data.batch_size", integer=True, minimum=1)``.
    """

    key: str
    integer: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    nullable: bool = False

    def allowed(self) -> str:
        """The allowed values in words, e.g. ``an integer >= 1`` or ``a finite number in (0, 1]``."""
        kind = "an integer" if self.integer else "a finite number"
        if self.minimum is not None and self.maximum is not None:
            left = "(" if self.exclusive_minimum else "["
            right = ")" if self.exclusive_maximum else "]"
            text = f"{kind} in {left}{_number(self.minimum)}, {_number(self.maximum)}{right}"
        elif self.minimum is not None:
            text = f"{kind} {'>' if self.exclusive_minimum else '>='} {_number(self.minimum)}"
        elif self.maximum is not None:
            text = f"{kind} {'<' if self.exclusive_maximum else '<='} {_number(self.maximum)}"
        else:
            text = kind
        return text + (" or null" if self.nullable else "")

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` has the right type and lies in the range."""
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.minimum is not None and (
            value < self.minimum or (self.exclusive_minimum and value == self.minimum)
        ):
            return False
        return self.maximum is None or not (
            value > self.maximum or (self.exclusive_maximum and value == self.maximum)
        )


def _number(x: float) -> str:
    """``4294967295`` for an integral bound, ``0.0001`` for a fractional one."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _int(key: str, minimum: int, maximum: int | None = None) -> NumericOption:
    return NumericOption(key, integer=True, minimum=minimum, maximum=maximum)


def _fraction(key: str) -> NumericOption:
    """A probability-like option in [0, 1)."""
    return NumericOption(key, minimum=0.0, maximum=1.0, exclusive_maximum=True)


NUMERIC_OPTIONS: tuple[NumericOption, ...] = (
    _int("seed", 0, 2**32 - 1),  # numpy's seed range (Lightning seeds numpy with it)
    # data
    _int("data.batch_size", 1),
    _int("data.eval_batch_size", 1),
    _int("data.val_days", 1),
    _int("data.heldout_days", 1),
    _int("data.end_offset_days", 0),
    _int("data.min_conversions.heldout", 0),
    _int("data.min_conversions.val", 0),
    _int("data.query_hash_buckets", 1),
    _int("data.hard_negatives", 0),
    _fraction("data.item_id_dropout"),
    _int("data.history.max_len", 0),
    _int("data.cofactors.dim", 0),
    NumericOption("data.cofactors.item_exponent", minimum=0.0),
    _int("data.history_examples.max_per_user", 0),
    _int("data.stream.chunk_rows", 1),
    # model
    _int("model.embedding_dim", 1),
    _int("model.hidden_dim", 1),
    _int("model.feature_embedding_dim", 1),
    _int("model.interference_every_n_steps", 0),
    NumericOption("model.optimizer.lr", minimum=0.0, exclusive_minimum=True),
    NumericOption("model.optimizer.weight_decay", minimum=0.0),
    _int("model.history_encoder.dim", 1),
    _int("model.history_encoder.num_layers", 1),
    _int("model.history_encoder.num_heads", 1),
    _fraction("model.history_encoder.dropout"),
    _int("model.cross.mlp_dims[]", 1),
    _fraction("model.cross.dropout"),
    _int("model.cross.cross_net.num_layers", 0),
    _int("model.cross.cross_net.rank", 1),
    _int("model.cross.cross_net.num_experts", 1),
    # loss
    NumericOption("loss.temperature", minimum=MIN_TEMPERATURE),
    NumericOption("loss.task_weights.*", minimum=0.0),
    NumericOption("loss.advertiser_weight", minimum=0.0),
    _int("loss.logq.num_buckets", 1),
    NumericOption("loss.logq.alpha", minimum=0.0, maximum=1.0, exclusive_minimum=True),
    NumericOption("loss.balancer.alpha", minimum=0.0),
    NumericOption("loss.balancer.lr_scale", minimum=0.0, exclusive_minimum=True),
    NumericOption("loss.balancer.init_log_var"),
    # trainer: max_epochs=-1 (Lightning's "forever") is refused; stop a run with Ctrl-C and resume it.
    _int("trainer.max_epochs", 1),
    _int("trainer.log_every_n_steps", 1),
    NumericOption("trainer.gradient_clip_val", minimum=0.0, nullable=True),
    _int("val_ks[]", 1),
    # eval
    _int("ks[]", 1),
    NumericOption(
        "bootstrap.level", minimum=0.0, maximum=1.0, exclusive_minimum=True, exclusive_maximum=True
    ),
    _int("bootstrap.n_boot", 0),
    _int("bootstrap.seed", 0, 2**32 - 1),
    _int("popularity_prior.select_k", 1),
    NumericOption("popularity_prior.betas[]", minimum=0.0),
    NumericOption("popularity_prior.fallback_weights[]", minimum=0.0),
    NumericOption("threads", integer=True, minimum=1, nullable=True),
    # the popularity blend train chooses on validation (conf/train.yaml's blend block)
    _int("blend.select_k", 1),
    NumericOption("blend.betas[]", minimum=0.0),
    NumericOption("blend.fallback_weights[]", minimum=0.0),
    # the served model (train's serve block) and label maturity (data/label_maturity)
    _int("serve.nlist", 1),
    _int("serve.nprobe", 1),
    _int("serve.overlap_k", 1),
    _int("serve.max_k", 1),
    _int("serve.max_rows", 1),
    NumericOption("data.label_maturity.window_days", minimum=0.0, exclusive_minimum=True),
    NumericOption("data.label_maturity.max_weight", minimum=1.0),
)


def _values(node: Any, parts: list[str], prefix: str) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every value ``parts`` reaches in ``node``; absent keys give nothing."""
    if not parts:
        return [(prefix, node)]
    head, rest = parts[0], parts[1:]
    is_list = head.endswith("[]")
    name = head.removesuffix("[]")
    if not hasattr(node, "keys"):
        return []
    children = [(str(k), node[k]) for k in node.keys()] if name == "*" else []
    if name != "*" and name in node:
        children = [(name, node[name])]
    out: list[tuple[str, Any]] = []
    for key, child in children:
        path = f"{prefix}.{key}" if prefix else key
        if is_list:
            if child is None:  # an unset list (e.g. popularity_prior.betas: null) holds no value
                continue
            items = list(child) if isinstance(child, Sequence) and not isinstance(child, str) else [child]
            for i, item in enumerate(items):
                out.extend(_values(item, rest, f"{path}[{i}]"))
        else:
            out.extend(_values(child, rest, path))
    return out


def check_numeric_options(cfg: Any, options: tuple[NumericOption, ...] = NUMERIC_OPTIONS) -> None:
    """Raise one ConfigError naming every option of ``cfg`` outside its allowed range.

    Args:
        cfg: a resolved config (DictConfig or nested dicts/lists).
        options: the table to check against (``NUMERIC_OPTIONS``).
    """
    bad = [
        f"{key}={value!r} (allowed: {option.allowed()})"
        for option in options
        for key, value in _values(cfg, option.key.split("."), "")
        if not option.accepts(value)
    ]
    if bad:
        raise ConfigError(
            f"Invalid option value{'s' if len(bad) > 1 else ''}: {'; '.join(bad)}. "
            "Fix the override (key=value) or the config file that sets it."
        )
