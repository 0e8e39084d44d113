"""The figures logged with every run (matplotlib, Agg backend): pure functions from numbers to a Figure.

* :func:`recall_figure` (``convcg eval``): recall@K against K for the model and every baseline, with
  the bootstrap CIs as bands, one panel per task;
* :func:`training_figure` (``convcg train``): per task, the training loss and the validation recall
  over steps;
* :func:`balancing_figure` (``convcg train`` with a learned balancer or the interference monitor):
  the effective task weights and the gradient cosines over steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from convcg_cli.metrics.bootstrap import ci_names
from convcg_cli.metrics.retrieval import metric_name

History = Sequence[tuple[int, float]]  # (step, value) in logging order
TASK_WEIGHT_PREFIX = "train/task_weight/"
GRAD_COSINE_PREFIX = "train/grad_cosine/"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def recall_axes(ax, ks: Sequence[int], task: str, title: str) -> None:
    """The axes of a recall@K panel: K on a log scale with a tick per cutoff, a light grid."""
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K")
    ax.set_ylabel(f"{task} recall@K")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def recall_figure(
    metrics: Mapping[str, float], split: str, tasks: Sequence[str], ks: Sequence[int], rankings: Sequence[str]
):
    """recall@K against K of each ranking (``model`` reads ``<split>/<task>/...``, a baseline
    ``<split>/<ranking>/<task>/...``), one panel per task; a band where CI bounds were logged."""
    plt = _pyplot()
    ks = sorted(int(k) for k in ks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for ranking in rankings:
            prefix = split if ranking == "model" else f"{split}/{ranking}"
            names = [metric_name(prefix, task, k) for k in ks]
            if not all(n in metrics for n in names):
                continue
            mean = np.array([metrics[n] for n in names])
            style = "-" if ranking == "model" else "--"
            (line,) = ax.plot(ks, mean, style, marker="o", ms=3, lw=1.5 if ranking == "model" else 1.0)
            line.set_label(ranking.removeprefix("baseline_"))
            bounds = [ci_names(n) for n in names]
            if all(lo in metrics and hi in metrics for lo, hi in bounds):
                low = [metrics[lo] for lo, _ in bounds]
                high = [metrics[hi] for _, hi in bounds]
                ax.fill_between(ks, low, high, color=line.get_color(), alpha=0.15, lw=0)
        recall_axes(ax, ks, task, f"{split} {task} recall@K (bands: 95% CI)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot_histories(ax, histories: Mapping[str, History], strip: str) -> None:
    for name, history in sorted(histories.items()):
        if history:
            steps, values = zip(*history, strict=True)
            ax.plot(
                steps, values, lw=1.0, marker="." if len(history) < 30 else None, label=name[len(strip) :]
            )
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def training_figure(histories: Mapping[str, History], tasks: Sequence[str]):
    """Per task (columns): the training loss ``train/<task>/loss`` (top) and the validation recall
    ``val/<task>/recall_at_<k>`` (bottom) over steps; the total ``train/loss`` joins each loss panel."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 6.5), squeeze=False)
    for column, task in enumerate(tasks):
        losses = {n: h for n, h in histories.items() if n in (f"train/{task}/loss", "train/loss")}
        _plot_histories(axes[0][column], losses, "train/")
        axes[0][column].set_title(f"{task}: training loss")
        recalls = {n: h for n, h in histories.items() if n.startswith(f"val/{task}/recall_at_")}
        _plot_histories(axes[1][column], recalls, f"val/{task}/")
        axes[1][column].set_title(f"{task}: validation recall")
    fig.tight_layout()
    return fig


def balancing_figure(histories: Mapping[str, History]):
    """The effective task weights (left) and the gradient cosines between tasks (right) over steps."""
    plt = _pyplot()
    fig, (weights, cosines) = plt.subplots(1, 2, figsize=(11, 4))
    _plot_histories(
        weights, {n: h for n, h in histories.items() if n.startswith(TASK_WEIGHT_PREFIX)}, TASK_WEIGHT_PREFIX
    )
    weights.set_title("effective task weights")
    _plot_histories(
        cosines, {n: h for n, h in histories.items() if n.startswith(GRAD_COSINE_PREFIX)}, GRAD_COSINE_PREFIX
    )
    cosines.axhline(0.0, color="grey", lw=0.8)
    cosines.set_title("gradient cosine (negative: tasks pull apart)")
    fig.tight_layout()
    return fig


def balancing_is_on(histories: Mapping[str, History]) -> bool:
    """Whether the balancing figure says anything: a gradient cosine was computed, or a task weight
    moved during training (a static balancer's weights are flat lines)."""
    if any(n.startswith(GRAD_COSINE_PREFIX) and h for n, h in histories.items()):
        return True
    return any(
        n.startswith(TASK_WEIGHT_PREFIX) and len({round(v, 9) for _, v in h}) > 1
        for n, h in histories.items()
    )
