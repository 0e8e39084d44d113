"""What a person sees in the MLflow UI: short headline metric names, run colours, and the hint that
opens the UI on a store.

- **Headline names**: the UI's runs table cuts a column header after about 15 characters, so
  ``heldout/conversion/recall_at_100`` and ``..._1000`` both read ``heldout/convers…``. Every
  ``<split>/<task>/recall_at_<k>`` with k in :data:`HEADLINE_KS` is also logged as
  ``r<k>_<task>_<split>`` (``r100_conversion_heldout``): the cut-off, then the task come first. A
  name without a ``/`` goes to the chart view's "Model metrics" section, which MLflow 3.17 puts after
  every ``prefix/`` section: typed into **Search metric charts** it shows alone (the browser test's
  path, docs/reference/mlflow-runs.md). The long names stay.
- **Run colours**: the UI draws a run in the colour of its ``mlflow.runColor`` tag (what its colour
  picker writes). Runs of one design share a colour and different designs get different ones, so a
  chart's lines and bars can be told apart without hovering.
- **UI hint**: a sqlite store needs ``mlflow ui`` started on it; a server already is the UI.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from urllib.parse import urlencode

from convcg_cli.tracking.store import Store, is_server

HEADLINE_KS = (100, 1000)
_RECALL = re.compile(r"(?P<split>[a-z]+)/(?P<task>[\w-]+)/recall_at_(?P<k>\d+)")

RUN_COLOR_TAG = "mlflow.runColor"  # MLflow's own tag: the UI draws the run in this colour
# Tableau 10: designs (trained runs, trials) get these, in order of first appearance in an experiment.
DESIGN_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
)  # fmt: skip
BASELINE_COLOURS = ("#525252", "#969696", "#737373", "#bdbdbd", "#252525")  # greys: the reference runs

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default


def headline_name(split: str, task: str, k: int) -> str:
    """The short name a headline recall is also logged under.

    Example:
        >>> headline_name("heldout", "conversion", 100)
        'r100_conversion_heldout'
    """
    return f"r{k}_{task}_{split}"


def headline_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The short-named copies (:func:`headline_name`) of the headline recalls among ``metrics``:
    ``<split>/<task>/recall_at_<k>`` with k in :data:`HEADLINE_KS` (not CI bounds, surfaces or
    subsets of the positives).

    Example:
        >>> headline_metrics({"heldout/conversion/recall_at_100": 0.5, "heldout/conversion/recall_at_10": 0.2,
        ...                   "heldout_ci/conversion/recall_at_100_ci_low": 0.4})
        {'r100_conversion_heldout': 0.5}
    """
    out = {}
    for name, value in metrics.items():
        match = _RECALL.fullmatch(name)
        if match and int(match["k"]) in HEADLINE_KS:
            out[headline_name(match["split"], match["task"], int(match["k"]))] = value
    return out


def parse_headline(name: str) -> tuple[int, str, str] | None:
    """``(k, split, task)`` of a short headline name, or None for any other metric.

    Example:
        >>> parse_headline("r1000_user_conversion_heldout"), parse_headline("train/loss")
        ((1000, 'heldout', 'user_conversion'), None)
    """
    match = re.fullmatch(r"r(\d+)_([\w-]+)_([a-z]+)", name)
    return (int(match[1]), match[3], match[2]) if match else None


def pick_colour(taken: Mapping[str, str], group: str, palette: tuple[str, ...]) -> str:
    """The colour of ``group``: the one its runs already have (``taken``: group -> colour), else the
    first colour of ``palette`` no other group has, else one by the number of groups.

    Example:
        >>> pick_colour({"a": "#1", "b": "#2"}, "c", ("#1", "#2", "#3"))
        '#3'
        >>> pick_colour({"a": "#1"}, "a", ("#2",)), pick_colour({"a": "#1"}, "b", ("#1",))
        ('#1', '#1')
    """
    if group in taken:
        return taken[group]
    used = set(taken.values())
    return next((c for c in palette if c not in used), palette[len(taken) % len(palette)])


def run_colour(store: Store, experiment_id: str, group_tag: str, group: str, palette: tuple[str, ...]) -> str:
    """The colour for a new run whose tag ``group_tag`` (``design``, ``baseline``) is ``group``, from
    the experiment's newest runs that carry that tag and a colour (:func:`pick_colour`)."""
    runs = store.client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{group_tag}` != ''",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    taken: dict[str, str] = {}
    for run in runs:
        tags = run.data.tags
        if RUN_COLOR_TAG in tags and group_tag in tags:
            taken.setdefault(tags[group_tag], tags[RUN_COLOR_TAG])
    return pick_colour(taken, group, palette)


def ui_url(
    server_uri: str, experiment_id: str | None = None, search_filter: str = "", order_by: str = ""
) -> str:
    """The UI page of an experiment's runs (filtered by ``search_filter``, sorted by metric
    ``order_by``, best first) on the server at ``server_uri``; the server's home without an id.

    Example:
        >>> ui_url("http://h:5000/", "3", "tags.kind = 'trained'")
        'http://h:5000/#/experiments/3/runs?searchFilter=tags.kind+%3D+%27trained%27'
    """
    base = server_uri.rstrip("/")
    if experiment_id is None:
        return base
    query = {"searchFilter": search_filter} if search_filter else {}
    if order_by:
        query.update(orderByKey=f"metrics.`{order_by}`", orderByAsc="false")
    return f"{base}/#/experiments/{experiment_id}/runs" + (f"?{urlencode(query)}" if query else "")


def ui_hint(
    tracking_uri: str, experiment_id: str | None = None, search_filter: str = "", order_by: str = ""
) -> str:
    """How to open the UI on a store: a server's page (:func:`ui_url`); for a local store the
    ``mlflow ui`` command of this installation (``resources.mlflow_command``: absolute unless it is
    the one ``PATH`` finds), followed, given an experiment, by the page to open once it started."""
    from convcg_cli.resources import mlflow_command

    if is_server(tracking_uri):
        return ui_url(tracking_uri, experiment_id, search_filter, order_by)
    command = f"{mlflow_command()} ui --backend-store-uri {shlex.quote(tracking_uri)}"
    if experiment_id is None:
        return command
    return f"{command}  then open  {ui_url(LOCAL_UI, experiment_id, search_filter, order_by)}"
