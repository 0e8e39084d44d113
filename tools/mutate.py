"""Mutation testing of the numerical core: does a test fail when the arithmetic is changed?

Each mutant is one small change to one module (an operator swapped, a comparison's boundary moved,
a constant bumped, a call or a statement dropped, or a hand-listed change from ``HAND_MUTANTS``),
made in a temporary copy of the checkout: the working tree is never modified, so an interrupted run
leaves nothing behind. The module's covering tests run against the mutant (``pytest -x -q -p
no:cacheprovider``, with a timeout); a failing run kills the mutant. Survivors a test cannot kill
because they do not change behaviour are listed, with a one-line reason each, in
``tools/mutation_equivalent.yaml``; the score is killed / (mutants - equivalent).

The runner imports the heavy third-party packages once (``PRELOADED``) and forks one test process
per mutant, so a mutant costs its tests, not a fresh torch import; it never imports ``convcg_cli``
itself, so each child imports the mutated copy.

Usage (``make mutate`` runs every module and writes ``reports/mutation/report.md``)::

    python tools/mutate.py                        # every module -> reports/mutation/report.md
    python tools/mutate.py --module losses        # one module; prints the survivors, writes no report
    python tools/mutate.py --module losses --list # the mutant ids, without running anything
    python tools/mutate.py --module losses --only StreamingLogQ  # the mutants whose id says so
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT_FILE = ROOT / "tools" / "mutation_equivalent.yaml"
REPORT_FILE = ROOT / "reports" / "mutation" / "report.md"
# What the covering tests need from the checkout (the package, its configs and schemas, the tests).
COPIED = ("convcg_cli", "tests", "conf", "data_schemas", "pyproject.toml")


@dataclass(frozen=True)
class Target:
    """One module under mutation and the test files that cover it (fastest first: ``-x`` stops early)."""

    path: str  # relative to the checkout
    tests: tuple[str, ...]


TARGETS: dict[str, Target] = {
    "retrieval": Target(
        "convcg_cli/metrics/retrieval.py",
        (
            "tests/metrics/test_retrieval_pins.py",
            "tests/metrics/test_retrieval.py",
            "tests/metrics/test_value_and_cold.py",
            "tests/metrics/test_bootstrap.py",
        ),
    ),
    "bootstrap": Target(
        "convcg_cli/metrics/bootstrap.py",
        ("tests/metrics/test_bootstrap_pins.py", "tests/metrics/test_bootstrap.py"),
    ),
    "metric_kernels": Target(  # recall's scan and the bootstrap's sums (numba: each mutant compiles)
        "convcg_cli/metrics/kernels.py",
        (
            "tests/metrics/test_retrieval_pins.py",
            "tests/metrics/test_bootstrap.py",
            "tests/metrics/test_retrieval.py",
        ),
    ),
    "search_kernels": Target(  # exact search's tile pass and key decoding (numba)
        "convcg_cli/index/kernels.py",
        ("tests/index/test_kernels.py", "tests/index/test_exact.py"),
    ),
    "losses": Target(
        "convcg_cli/models/losses.py",
        (
            "tests/models/test_loss_pins.py",
            "tests/models/test_mixed_log_q_pins.py",
            "tests/models/test_losses.py",
            "tests/models/test_loss_levers.py",
        ),
    ),
    "batches": Target(
        "convcg_cli/data/loading/batches.py",
        (
            "tests/data/test_batch_pins.py",
            "tests/data/test_random_negative_pins.py",
            "tests/data/test_stream.py",
        ),
    ),
    "negatives": Target(
        "convcg_cli/data/loading/negatives.py",
        ("tests/data/test_batch_pins.py", "tests/data/test_stream.py"),
    ),
    "baselines": Target(
        "convcg_cli/baselines.py",
        (
            "tests/test_baseline_options.py",
            "tests/test_baseline_pins.py",
            "tests/test_baseline_history_pins.py",
            "tests/test_baselines.py",
        ),
    ),
    "baseline_scores": Target(
        "convcg_cli/baseline_scores.py",
        (
            "tests/test_baseline_scores_edges.py",
            "tests/test_baseline_pins.py",
            "tests/test_baselines.py",
            "tests/test_baseline_tuning.py",
            "tests/test_baseline_scores_blocks.py",
        ),
    ),
    "prior": Target(
        "convcg_cli/metrics/prior.py",
        ("tests/metrics/test_prior_pins.py", "tests/metrics/test_prior.py"),
    ),
    "blend": Target(
        "convcg_cli/blend.py",
        ("tests/test_blend_choice_pins.py", "tests/test_blend_pins.py", "tests/test_blend.py"),
    ),
    "split": Target(
        "convcg_cli/data/features/time_split.py",
        ("tests/data/test_split_pins.py", "tests/data/test_time_split.py"),
    ),
}

# Changes no generated operator makes, each written as (module, exact text, replacement); the text
# must occur exactly once in the module. The survivors the mutation audit of issue 26 found.
HAND_MUTANTS: tuple[tuple[str, str, str], ...] = (
    ("batches", '"log_q": item_log_q[item_pos]', '"log_q": item_log_q[: len(item_pos)]'),
    (
        "batches",
        "offset = (u * count).long()",
        "offset = (u * (count - 1)).long()",
    ),
    (
        "batches",
        "max(len(self.item_pos) // self.batch_size // world, 1)",
        "max(-(-len(self.item_pos) // self.batch_size) // world, 1)",
    ),
    ("metric_kernels", "stop = min(start + _BLOCK, width)", "stop = min(start + _BLOCK - 1, width)"),
    (
        "baselines",
        "validation_recall(self, history.validation, self.select_k)",
        "validation_recall(self, history.validation, 1)",
    ),
    ("bootstrap", "np.full(n_users, 1.0 / n_users)", "np.full(n_users, 1.0 / (n_users + 1))"),
    (
        "losses",
        "(1 - self.alpha) * self.interval[uniq] + self.alpha * gap",
        "self.alpha * self.interval[uniq] + (1 - self.alpha) * gap",
    ),
    (
        "losses",
        "return (w * ce).sum() / w.sum()\n\n\nclass TableLogQ",
        "return ce.mean()\n\n\nclass TableLogQ",
    ),
    ("baselines", "topk = baseline.query_topk(users, k)", "topk = baseline.query_topk(users, 1)"),
    ("baselines", "before = day < last", "before = day <= last"),
)

# The survivors of the issue 26 audit (each would be a real bug) and the test written to kill it: the
# report says whether each was killed in this run. (module, mutant id) -> the test.
WATCHED: dict[tuple[str, str], str] = {
    (
        "losses",
        'sampled_softmax_loss: torch.einsum("ad,ahd->ah", query[rows], hard_items[rows]) / temperature '
        "-> torch.einsum('ad,ahd->ah', query[rows], hard_items[rows])",
    ): "tests/models/test_loss_pins.py::test_hard_negatives_are_divided_by_the_temperature",
    (
        "losses",
        "sampled_softmax_loss: hard_ids[rows] < 0 -> hard_ids[rows] <= 0",
    ): "tests/models/test_loss_pins.py::test_a_hard_negative_with_item_id_zero_changes_the_loss",
    (
        "batches",
        'hand: "log_q": item_log_q[item_pos] -> "log_q": item_log_q[: len(item_pos)]',
    ): "tests/data/test_batch_pins.py::test_a_batch_reads_features_and_logq_of_its_own_items",
    (
        "batches",
        "ShuffledBatches.__iter__: self.epoch += 1 -> pass",
    ): "tests/data/test_batch_pins.py::test_every_epoch_is_a_new_permutation_seeded_by_seed_plus_epoch",
    (
        "batches",
        "ShuffledBatches.__iter__: self.seed + self.epoch -> self.seed",
    ): "tests/data/test_batch_pins.py::test_every_epoch_is_a_new_permutation_seeded_by_seed_plus_epoch",
    (
        "batches",
        "hand: offset = (u * count).long() -> offset = (u * (count - 1)).long()",
    ): "tests/data/test_batch_pins.py::test_hard_negatives_are_uniform_over_the_whole_pool",
    (
        "batches",
        "hand: max(len(self.item_pos) // self.batch_size // world, 1) "
        "-> max(-(-len(self.item_pos) // self.batch_size) // world, 1)",
    ): "tests/data/test_batch_pins.py::test_batches_per_epoch_drop_the_partial_batch",
    (
        "batches",
        "SequentialBatches.__len__: self.n + self.batch_size - 1 -> self.n + self.batch_size",
    ): "tests/data/test_batch_pins.py::test_sequential_batches_keep_the_partial_last_batch",
    (
        "batches",
        "ShuffledBatches.__iter__: int(torch.randint(1 << 62, (1,), generator=g)) + rank "
        "-> int(torch.randint(1 << 62, (1,), generator=g))",
    ): "tests/data/test_batch_pins.py::test_each_rank_draws_its_own_hard_negative_stream",
    (
        "batches",
        "ShardedBatches.__iter__: int(torch.randint(1 << 62, (1,), generator=g)) + rank "
        "-> int(torch.randint(1 << 62, (1,), generator=g))",
    ): "tests/data/test_batch_pins.py::test_each_rank_draws_its_own_hard_negatives_from_equal_shards",
    (
        "bootstrap",
        "hand: np.full(n_users, 1.0 / n_users) -> np.full(n_users, 1.0 / (n_users + 1))",
    ): "tests/metrics/test_bootstrap_pins.py::test_every_user_is_drawn_with_probability_one_over_n",
    (
        "bootstrap",
        "PairedDifference.above_zero: self.low > 0.0 -> self.low >= 0.0",
    ): "tests/metrics/test_bootstrap_pins.py::test_above_zero_needs_the_lower_bound_strictly_above_zero",
    (
        "bootstrap",
        "_check_resampling: 0.0 < level < 1.0 -> 0.0 <= level < 1.0",
    ): "tests/metrics/test_bootstrap_pins.py::test_a_level_outside_the_open_unit_interval_is_rejected",
    (
        "losses",
        "hand: (1 - self.alpha) * self.interval[uniq] + self.alpha * gap "
        "-> self.alpha * self.interval[uniq] + (1 - self.alpha) * gap",
    ): "tests/models/test_loss_pins.py::test_streaming_logq_at_an_alpha_other_than_one_half",
    (
        "losses",
        "hand: return (w * ce).sum() / w.sum() class TableLogQ -> return ce.mean() class TableLogQ",
    ): "tests/models/test_loss_pins.py::test_the_advertiser_loss_is_the_weighted_mean_over_anchor_rows",
    (
        "metric_kernels",
        "hand: stop = min(start + _BLOCK, width) -> stop = min(start + _BLOCK - 1, width)",
    ): "tests/metrics/test_retrieval_pins.py::test_recall_is_the_loop_whatever_the_list",
    (
        "baselines",
        "MostPopular.__init__: False -> True",
    ): "tests/test_baseline_pins.py::test_popularity_ignores_the_user_history_unless_asked",
    (
        "baselines",
        "hand: before = day < last -> before = day <= last",
    ): "tests/test_baseline_pins.py::test_repeat_share_counts_only_earlier_days_and_never_mixes_pairs",
    (
        "baselines",
        "EASEPopularity._scores: np.abs(scores) -> scores",
    ): "tests/test_baseline_pins.py::test_the_blend_scales_ease_by_its_largest_absolute_score",
    (
        "baselines",
        "hand: validation_recall(self, history.validation, self.select_k) "
        "-> validation_recall(self, history.validation, 1)",
    ): "tests/test_baseline_pins.py::test_the_weight_is_chosen_by_recall_at_select_k",
}

# Operator swaps: a boundary moved, an operation replaced by its neighbour.
_BINOP_SWAP = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
}
_BINOP_DROP_RIGHT = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv)  # `a - 1` -> `a`
_CMP_SWAP = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_NAME_SWAP = {
    "min": "max",
    "max": "min",
    "argmin": "argmax",
    "argmax": "argmin",
    "minimum": "maximum",
    "maximum": "minimum",
    "any": "all",
    "all": "any",
    "clamp_min": "clamp_max",
    "clamp_max": "clamp_min",
    "sum": "mean",
    "mean": "sum",
}
# Literal axes, shapes and zip's strictness are plumbing: changing them crashes or changes nothing.
_PLUMBING_KEYWORDS = {"axis", "dim", "strict"}
_PLUMBING_CALLS = {"squeeze", "unsqueeze", "reshape", "view"}
_UNWRAPPED_CALLS = {"abs", "np.abs", "torch.abs", "np.sqrt", "np.log1p", "F.normalize"}


@dataclass(frozen=True)
class Mutant:
    """One change to one module: ``key`` names it stably (function, text before -> after)."""

    module: str
    key: str
    line: int
    source: str  # the whole mutated module


@dataclass
class Outcome:
    """How one mutant fared: ``killed`` (a test failed), ``timeout`` (killed by the clock) or ``survived``."""

    mutant: Mutant
    status: str
    seconds: float


@dataclass
class ModuleResult:
    """Every mutant of one module, with the equivalents that were declared for it."""

    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    equivalent: dict[str, str] = field(default_factory=dict)  # key -> reason, the ones that survived
    stale: list[str] = field(default_factory=list)  # declared equivalents no longer generated
    stale_hand: list[str] = field(default_factory=list)  # hand mutants whose text is gone
    baseline_seconds: float = 0.0

    def count(self, *statuses: str) -> int:
        return sum(o.status in statuses for o in self.outcomes)

    @property
    def survivors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "survived" and o.mutant.key not in self.equivalent]

    @property
    def score(self) -> float:
        scored = len(self.outcomes) - len(self.equivalent)
        return self.count("killed", "timeout") / scored if scored else 1.0


# --------------------------------------------------------------------------- generating mutants


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Sites(ast.NodeVisitor):
    """Collects (qualname, node, replacement text) for every mutation site of one module.

    Left alone: docstrings, strings and f-strings, annotations, ``raise`` and ``assert`` statements
    (their text is messages), module-level statements (constants; they are read by the functions),
    assignment targets, and literal axes and shapes (``_PLUMBING_*``).
    """

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.sites: list[tuple[str, ast.AST, str]] = []

    # -- scopes
    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.stack.append(node.name)
        for stmt in node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.visit(stmt)
        self.stack.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.stack.append(node.name)
        qualname = ".".join(self.stack)
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            if isinstance(default, ast.Constant) and isinstance(default.value, bool):  # a flag's default
                self.sites.append((qualname, default, repr(not default.value)))
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        for stmt in body:
            self._statement(qualname, stmt)
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Module(self, node: ast.Module) -> None:
        for stmt in node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.visit(stmt)

    # -- statements
    def _statement(self, qualname: str, stmt: ast.stmt) -> None:
        if isinstance(stmt, (ast.Raise, ast.Assert)):
            return
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.visit(stmt)
            return
        deletable = (
            isinstance(stmt, ast.AugAssign)
            or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call))
            or (isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Subscript) for t in stmt.targets))
        )
        if deletable:
            self.sites.append((qualname, stmt, "pass"))
        if isinstance(stmt, ast.AugAssign) and type(stmt.op) in _BINOP_SWAP:
            swapped = copy.deepcopy(stmt)
            swapped.op = _BINOP_SWAP[type(stmt.op)]()
            self.sites.append((qualname, stmt, ast.unparse(swapped)))
        for name, value in ast.iter_fields(stmt):
            if name not in ("annotation", "returns", "targets", "target"):  # types; what is assigned to
                self._children(qualname, value)

    def _children(self, qualname: str, value: object) -> None:
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, ast.stmt):
                self._statement(qualname, child)
            elif isinstance(child, ast.expr):
                if not isinstance(getattr(child, "ctx", None), (ast.Store, ast.Del)):
                    self._expression(qualname, child)
            elif (
                isinstance(child, ast.keyword)
                and child.arg in _PLUMBING_KEYWORDS
                and _is_literal(child.value)
            ):
                continue
            elif isinstance(child, ast.AST):  # keyword, comprehension, withitem, except handler, ...
                for name, grandchild in ast.iter_fields(child):
                    if name != "target":
                        self._children(qualname, grandchild)

    # -- expressions
    def _expression(self, qualname: str, node: ast.expr) -> None:
        if isinstance(node, (ast.JoinedStr, ast.Lambda)):
            return
        for replacement in self._replacements(node):
            self.sites.append((qualname, node, replacement))
        for name, value in ast.iter_fields(node):
            if name == "args" and isinstance(node, ast.Call) and _callee(node) in _PLUMBING_CALLS:
                value = [a for a in value if not _is_literal(a)]
            self._children(qualname, value)

    @staticmethod
    def _replacements(node: ast.AST) -> Iterator[str]:
        if isinstance(node, ast.Slice):
            return  # not an expression of its own: its bounds are visited
        if isinstance(node, ast.BinOp):
            if type(node.op) in _BINOP_SWAP:
                binop = copy.deepcopy(node)
                binop.op = _BINOP_SWAP[type(node.op)]()
                yield ast.unparse(binop)
            if isinstance(node.op, _BINOP_DROP_RIGHT):
                yield ast.unparse(node.left)
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _CMP_SWAP:
                    compare = copy.deepcopy(node)
                    compare.ops[i] = _CMP_SWAP[type(op)]()
                    yield ast.unparse(compare)
        elif isinstance(node, ast.BoolOp):
            boolop = copy.deepcopy(node)
            boolop.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            yield ast.unparse(boolop)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
            yield ast.unparse(node.operand)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool):
                yield repr(not node.value)
            elif isinstance(node.value, (int, float)):
                yield repr(node.value + 1)
        elif isinstance(node, ast.Call):
            if ast.unparse(node.func) in _UNWRAPPED_CALLS and len(node.args) == 1 and not node.keywords:
                yield ast.unparse(node.args[0])
            name = _callee(node)
            if name in _NAME_SWAP:
                call = copy.deepcopy(node)
                if isinstance(call.func, ast.Attribute):
                    call.func.attr = _NAME_SWAP[name]
                else:
                    call.func = ast.Name(_NAME_SWAP[name], ast.Load())
                yield ast.unparse(call)


def _is_literal(node: ast.AST) -> bool:
    """A number or a negated number (``1``, ``-1``)."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant)


def _callee(node: ast.Call) -> str:
    return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")


def _line_starts(data: bytes) -> list[int]:
    starts, pos = [0], 0
    for line in data.splitlines(keepends=True):
        pos += len(line)
        starts.append(pos)
    return starts


def generate(name: str, target: Target, root: Path = ROOT) -> tuple[list[Mutant], list[str]]:
    """The mutants of one module (generated, then hand-listed) and the hand mutants whose text is gone."""
    text = (root / target.path).read_text()
    data = text.encode()
    starts = _line_starts(data)
    tree = ast.parse(text)
    visitor = _Sites()
    visitor.visit(tree)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    mutants: list[Mutant] = []
    seen: dict[str, int] = {}
    sources: set[str] = set()

    def add(qualname: str, before: str, after: str, line: int, source: str) -> None:
        if source == text or source in sources:
            return  # no change, or the same change as an earlier mutant
        sources.add(source)
        try:
            compile(source, target.path, "exec")
        except SyntaxError:
            return
        key = f"{qualname}: {_one_line(before)} -> {_one_line(after)}"
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            key = f"{key} #{seen[key]}"
        mutants.append(Mutant(name, key, line, source))

    def span(node: ast.AST) -> tuple[int, int]:
        lo = starts[node.lineno - 1] + node.col_offset  # type: ignore[attr-defined]
        return lo, starts[node.end_lineno - 1] + node.end_col_offset  # type: ignore[attr-defined]

    for qualname, node, replacement in visitor.sites:
        lo, hi = span(node)
        after = replacement if isinstance(node, ast.stmt) else f"({replacement})"
        source = (data[:lo] + after.encode() + data[hi:]).decode()
        before_key, after_key = data[lo:hi].decode(), replacement
        parent = parents.get(node)
        if isinstance(node, ast.Constant) and isinstance(parent, (ast.expr, ast.keyword)):
            # A bare "1 -> 2" says little: name it by the expression around it, when that is short.
            p_lo, p_hi = span(parent)
            if p_hi - p_lo <= 60:
                before_key = data[p_lo:p_hi].decode()
                after_key = (data[p_lo:lo] + replacement.encode() + data[hi:p_hi]).decode()
        add(qualname, before_key, after_key, node.lineno, source)  # type: ignore[attr-defined]

    stale = []
    for module, old, new in HAND_MUTANTS:
        if module != name:
            continue
        if text.count(old) != 1:
            stale.append(f"{_one_line(old)} -> {_one_line(new)}")
            continue
        line = text[: text.index(old)].count("\n") + 1
        add("hand", old, new, line, text.replace(old, new))
    return mutants, stale


# --------------------------------------------------------------------------- running mutants


class _Checkout:
    """A temporary copy of the checkout's package, configs and tests, where mutants are written."""

    def __init__(self, base: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="checkout-", dir=base))
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, self.root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, self.root / name)


# Imported once by the runner before it forks a test process per mutant: the heavy third-party
# imports (torch and lightning alone take seconds) are paid once, not once per mutant. The runner
# itself never imports convcg_cli, so every child imports the package afresh, from its checkout.
PRELOADED = (
    *("numpy", "scipy.sparse", "scipy.stats", "scipy.linalg", "polars", "torch", "lightning", "pytest"),
    *("omegaconf", "hydra", "faiss"),
)


def _preload() -> None:
    import importlib

    for name in PRELOADED:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    assert not any(m == "convcg_cli" or m.startswith("convcg_cli.") for m in sys.modules), (
        "runner imported convcg_cli"
    )


@dataclass
class _Running:
    """A forked test process and what to undo when it ends."""

    pid: int
    checkout: _Checkout
    mutant: Mutant | None
    original: str
    started: float


def _fork_tests(checkout: _Checkout, target: Target, source: str | None) -> _Running:
    """Write ``source`` over the target module in ``checkout`` (None: leave it) and fork its tests."""
    path = checkout.root / target.path
    original = path.read_text()
    if source is not None:
        _atomic_write(path, source)
    pid = os.fork()
    if pid == 0:  # the child: its own process group, the checkout's package first on the path
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.chdir(checkout.root)
            os.environ["PYTHONPATH"] = str(checkout.root)  # subprocesses the tests start see the mutant too
            os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
            sys.dont_write_bytecode = True  # a stale .pyc of an equally long mutant would hide the next
            sys.path.insert(0, str(checkout.root))
            import pytest

            args = ["-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *target.tests]
            os._exit(int(pytest.main(args)))
        except BaseException:
            os._exit(99)
    return _Running(pid, checkout, None, original, time.monotonic())


def _finish(job: _Running, target: Target) -> None:
    """Put the module back as it was before ``job`` (the checkout is then free for the next mutant)."""
    path = job.checkout.root / target.path
    if path.read_text() != job.original:
        _atomic_write(path, job.original)


def _kill(job: _Running) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(job.pid, 0)


def _run_all(
    checkouts: list[_Checkout], target: Target, sources: list[str | None], timeout: float, report
) -> None:
    """Run the tests once per source, ``len(checkouts)`` at a time; ``report(i, status, seconds)``."""
    free = list(checkouts)
    pending = list(enumerate(sources))
    running: dict[int, tuple[int, _Running]] = {}
    try:
        while pending or running:
            while pending and free:
                i, source = pending.pop(0)
                job = _fork_tests(free.pop(), target, source)
                running[job.pid] = (i, job)
            time.sleep(0.05)
            for pid, (i, job) in list(running.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                elapsed = time.monotonic() - job.started
                if done == 0 and elapsed < timeout:
                    continue
                if done == 0:
                    _kill(job)
                    outcome = "timeout"
                else:
                    outcome = "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # anything the tests left running
                del running[pid]
                _finish(job, target)
                free.append(job.checkout)
                report(i, outcome, elapsed)
    finally:
        for _, job in running.values():  # interrupted: stop the tests, restore the copies
            _kill(job)
            _finish(job, target)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_equivalent(path: Path = EQUIVALENT_FILE) -> dict[str, dict[str, str]]:
    """module -> {mutant key: reason} from the committed list of equivalent mutants."""
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return {str(m): {str(k): str(v) for k, v in (keys or {}).items()} for m, keys in data.items()}


def run_module(
    name: str, checkouts: list[_Checkout], equivalent: dict[str, str], only: str | None = None
) -> ModuleResult:
    """Every mutant of module ``name`` (whose key contains ``only``), ``len(checkouts)`` at a time."""
    target = TARGETS[name]
    # From the copy, not the working tree: others may be editing the module meanwhile.
    mutants, stale_hand = generate(name, target, root=checkouts[0].root)
    mutants = [m for m in mutants if only is None or only in m.key]
    baseline: list[tuple[str, float]] = []
    _run_all(checkouts[:1], target, [None], 1800, lambda i, status, secs: baseline.append((status, secs)))
    status, seconds = baseline[0]
    if status != "survived":
        raise SystemExit(f"{name}: the covering tests fail without any mutant ({', '.join(target.tests)}).")
    result = ModuleResult(name, stale_hand=stale_hand, baseline_seconds=seconds)
    timeout = max(30.0, 4 * seconds)
    print(f"{name}: {len(mutants)} mutants, tests {seconds:.1f} s unmutated", flush=True)
    outcomes: dict[int, Outcome] = {}

    def report(i: int, status: str, secs: float) -> None:
        mutant = mutants[i]
        outcomes[i] = Outcome(mutant, status, secs)
        if status == "survived":
            note = "  (equivalent)" if mutant.key in equivalent else ""
            print(f"  survived L{mutant.line}: {mutant.key}{note}", flush=True)

    _run_all(checkouts, target, [m.source for m in mutants], timeout, report)
    result.outcomes = [outcomes[i] for i in range(len(mutants))]
    keys = {m.key for m in mutants}
    survived = {o.mutant.key for o in result.outcomes if o.status == "survived"}
    result.equivalent = {k: v for k, v in equivalent.items() if k in survived}
    result.stale = sorted(k for k in equivalent if k not in keys or k not in survived)
    return result


# --------------------------------------------------------------------------- the report


def render(results: list[ModuleResult], wall_seconds: float, jobs: int) -> str:
    """``reports/mutation/report.md``: per module killed / survived / equivalent, then the details."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Mutation testing of the numerical core",
        "",
        f"`make mutate` (`tools/mutate.py`), {when}: {sum(len(r.outcomes) for r in results)} mutants in "
        f"{wall_seconds / 60:.1f} min ({jobs} at a time, `nice -n 19`, 2 CPU cores shared with other work). "
        "Each mutant is one change to one module in a temporary copy of the checkout, run against the "
        "module's covering tests (`pytest -x -q -p no:cacheprovider -m 'not slow'`). Killed counts the "
        "mutants a test failed on (or that ran past the timeout, 4x the unmutated tests); equivalent "
        "survivors (`tools/mutation_equivalent.yaml`, each with its reason) are left out of the score: "
        "killed / (mutants - equivalent).",
        "",
        "| module | mutants | killed | timeout | survived | equivalent | score | tests (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cells = [
            f"`{TARGETS[r.name].path.removeprefix('convcg_cli/')}`",
            len(r.outcomes),
            r.count("killed"),
            r.count("timeout"),
            len(r.survivors),
            len(r.equivalent),
            f"{100 * r.score:.0f}%",
            f"{r.baseline_seconds:.1f}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Covering tests per module:", ""]
    lines += [f"- `{r.name}`: " + ", ".join(f"`{t}`" for t in TARGETS[r.name].tests) for r in results]
    status = {(r.name, o.mutant.key): o.status for r in results for o in r.outcomes}
    watched = [(m, k, t) for (m, k), t in WATCHED.items() if any(r.name == m for r in results)]
    if watched:
        lines += [
            "",
            "## The survivors of the audit in issue 26",
            "",
            "Each would be a real bug; the test written to kill it, and what it did in this run.",
            "",
            "| module | mutant | killed by | this run |",
            "|---|---|---|---|",
        ]
        for module, key, test in watched:
            outcome = status.get((module, key), "not generated (stale id)")
            lines.append(f"| {module} | `{key}` | `{test}` | {outcome} |")
    for r in results:
        lines += ["", f"## {r.name} (`{TARGETS[r.name].path}`)", ""]
        if r.survivors:
            lines += ["Survivors (no test notices them):", ""]
            lines += [f"- L{o.mutant.line} `{o.mutant.key}`" for o in r.survivors]
            lines.append("")
        else:
            lines += ["No survivors.", ""]
        if r.equivalent:
            lines += ["Equivalent (survive, and cannot be killed):", ""]
            by_key = {o.mutant.key: o.mutant.line for o in r.outcomes}
            lines += [f"- L{by_key[k]} `{k}`: {reason}" for k, reason in sorted(r.equivalent.items())]
            lines.append("")
        if r.stale:
            lines += ["Declared equivalent but not a survivor now (stale entries to remove):", ""]
            lines += [f"- `{k}`" for k in r.stale]
            lines.append("")
        if r.stale_hand:
            lines += ["Hand mutants whose text is no longer in the module (update `HAND_MUTANTS`):", ""]
            lines += [f"- `{k}`" for k in r.stale_hand]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", choices=sorted(TARGETS), help="only these (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the mutant ids and run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at a time (one temp checkout each)")
    parser.add_argument(
        "--out", type=Path, help=f"report path (default {REPORT_FILE.relative_to(ROOT)} for a full run)"
    )
    parser.add_argument("--only", help="only the mutants whose id contains this text (no report)")
    args = parser.parse_args(argv)
    names = args.module or list(TARGETS)
    if args.list:
        for name in names:
            mutants, stale = generate(name, TARGETS[name])
            mutants = [m for m in mutants if args.only is None or args.only in m.key]
            print(f"{name}: {len(mutants)} mutants")
            for m in mutants:
                print(f"  L{m.line}: {m.key}")
            for s in stale:
                print(f"  STALE hand mutant: {s}")
        return 0

    equivalent = load_equivalent()
    out = args.out or (REPORT_FILE if not (args.module or args.only) else None)
    # SIGTERM (a killed make) unwinds like Ctrl-C: the test processes end and the copies are removed.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    start = time.monotonic()
    _preload()
    base = Path(tempfile.mkdtemp(prefix="convcg-mutate-"))
    try:
        checkouts = [_Checkout(base) for _ in range(max(1, args.jobs))]
        results = [run_module(n, checkouts, equivalent.get(n, {}), args.only) for n in names]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    wall = time.monotonic() - start
    for r in results:
        print(
            f"{r.name}: {len(r.outcomes)} mutants, {r.count('killed', 'timeout')} killed, "
            f"{len(r.survivors)} survived, {len(r.equivalent)} equivalent: {100 * r.score:.0f}%"
        )
    print(f"wall time {wall / 60:.1f} min")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(out, render(results, wall, max(1, args.jobs)))
        print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
