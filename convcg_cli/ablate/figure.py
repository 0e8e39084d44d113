"""``recall.png`` of ``convcg ablate``: recall@K per variant, one panel per task."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from convcg_cli.ablate.summary import DESIGN, TASKS, Row
from convcg_cli.figures import recall_axes

FIGURE_FILE = "recall.png"


def plot_recall(rows: list[Row], ks: Sequence[int], path: Path) -> Path:
    """recall@K per variant, one panel per task; error bars are the rows' 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ks = sorted(ks)
    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4.5), sharex=True)
    colours = plt.get_cmap("tab20")
    for ax, task in zip(np.atleast_1d(axes), TASKS, strict=True):
        for i, row in enumerate(rows):
            mean = np.array([row.mean[(task, k)] for k in ks])
            if np.isnan(mean).all():
                continue
            # A t-interval of few seeds can cross 0 or 1; recall cannot, so the bars are clipped there.
            low = np.clip([row.low[(task, k)] for k in ks], 0.0, 1.0)
            high = np.clip([row.high[(task, k)] for k in ks], 0.0, 1.0)
            err = np.nan_to_num(np.vstack([mean - low, high - mean]))
            style = "-" if row.kind == DESIGN else "--"
            ax.errorbar(
                ks,
                mean,
                yerr=err,
                fmt=style,
                marker="o",
                ms=3,
                capsize=2,
                lw=1.2,
                color=colours((2 * i) % 20 + (i // 10) % 2),  # tab20: dark hues first, then light
                label=row.name,
            )
        recall_axes(ax, ks, task, f"{task} (mean ± 95% CI)")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
