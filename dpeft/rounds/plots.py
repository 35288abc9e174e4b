"""The PNG plots next to ``metrics.jsonl``: accuracy by round, accuracy by wall time, traffic by direction.

- ``accuracy.png``: global eval accuracy (generation accuracy and the clients' federated accuracy
  when the run has them) and eval loss against the round; the legend sits under the axes so it
  never covers data, the x axis or its last tick; rounds are integer ticks.
- ``time.png``: eval accuracy against the run's wall-clock time (``elapsed_s``; summed ``wall_s``
  when rows lack it), the plot to put next to another run's when comparing sync policies.
- ``bytes.png``: one panel per direction (up, down), each in its own unit, labelled for what the
  bytes are: client updates and the global (coordinator runs), ring traffic (all-reduce), or the
  edges' and the cloud's activations and gradients (split mode).

Everything here takes the metrics rows and a directory; matplotlib is imported on first use.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

#: (up label, down label, what the bars count) for each kind of traffic
TRAFFIC = {
    "federated": ("up: client updates to the aggregator", "down: global adapter to the clients", "per round"),
    "allreduce": ("up: sent by all ranks (ring all-reduce)", "down: received by all ranks (ring all-reduce)", "per round"),
    "split": (
        "up: edges to the cloud (activations, gradients)",
        "down: cloud to the edges (activations, gradients)",
        "per round, all edges",
    ),
}


def traffic_kind(rows: list[dict[str, Any]]) -> str:
    """federated, allreduce or split, from the fields the rows carry."""
    if any("split_steps" in r for r in rows):
        return "split"
    if any(r.get("transport") == "allreduce" for r in rows):
        return "allreduce"
    return "federated"


#: the thread :func:`prewarm` started in this process (None: not started)
_WARMING: threading.Thread | None = None


def _warm() -> None:
    try:
        fig = _figure(figsize=(2, 2))
        ax = fig.subplots()
        ax.plot([0, 1], [0, 1], marker="o")
        ax.set_xlabel("round")
        fig.canvas.draw()  # imports the renderer and loads the font once
    except Exception:  # noqa: BLE001 - the plots at the end report their own errors
        pass


def prewarm() -> None:
    """Import matplotlib and load its font in a background thread, once per process, so that
    the plots written when the run ends cost only their drawing (about half a second less at
    the end of every run). Launchers call it once the run's processes are started (never
    before forking workers) and only when they will write plots."""
    global _WARMING
    if _WARMING is None:
        _WARMING = threading.Thread(target=_warm, daemon=True, name="dpeft-plots-warm")
        _WARMING.start()


def _figure(**kwargs: Any) -> Any:
    """A figure of its own (matplotlib's object API, not pyplot: no global figure registry or
    backend switch, safe from any thread, and a lighter import)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)  # draws PNGs (and gives the tests a renderer)
    return fig


def _integer_ticks(ax: Any) -> None:
    """Whole-number round ticks, also when the axis spans fewer than two whole numbers (one round)."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    low, high = ax.get_xlim()
    if int(high) - int(low) < 2:  # MaxNLocator falls back to fractional ticks here
        ax.xaxis.set_major_locator(FixedLocator([r for r in range(int(low), int(high) + 1) if low <= r <= high]))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _unit(values: list[float]) -> tuple[float, str]:
    """A divisor and unit name that keep the largest value readable."""
    top = max(values, default=0.0)
    for scale, name in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if top >= scale:
            return float(scale), name
    return 1.0, "B"


def accuracy_figure(rows: list[dict[str, Any]]) -> Any:
    """The accuracy-by-round figure (None when no row was evaluated)."""
    evaluated = [r for r in rows if r.get("eval_accuracy") is not None]
    if not evaluated:
        return None
    fig = _figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    ax.plot([r["round"] for r in evaluated], [r["eval_accuracy"] for r in evaluated], marker="o", label="eval accuracy")
    gen = [r for r in evaluated if r.get("gen_accuracy") is not None]
    if gen:
        ax.plot(
            [r["round"] for r in gen],
            [r["gen_accuracy"] for r in gen],
            marker="s",
            color="tab:green",
            label="generation accuracy",
        )
    fed = [r for r in rows if r.get("fed_eval_accuracy") is not None]
    if fed:  # eval.federated: the clients' accuracy on their held-out examples
        ax.plot(
            [r["round"] for r in fed], [r["fed_eval_accuracy"] for r in fed], marker="^", label="clients' accuracy (federated)"
        )
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    _integer_ticks(ax)
    losses = [r for r in evaluated if r.get("eval_loss") is not None]
    if losses:
        ax2 = ax.twinx()
        ax2.plot(
            [r["round"] for r in losses],
            [r["eval_loss"] for r in losses],
            color="tab:red",
            alpha=0.6,
            marker=".",
            label="eval loss",
        )
        ax2.set_ylabel("eval loss")
    handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 2), frameon=False)
    return fig


def time_figure(rows: list[dict[str, Any]]) -> Any:
    """Eval accuracy against the run's wall time (None when no row was evaluated)."""
    clock, total = [], 0.0
    for r in rows:
        total += float(r.get("wall_s") or 0.0)
        clock.append(float(r["elapsed_s"]) if r.get("elapsed_s") is not None else total)
    points = [(t, r) for t, r in zip(clock, rows, strict=True) if r.get("eval_accuracy") is not None]
    if not points:
        return None
    fig = _figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    ax.plot([t for t, _ in points], [r["eval_accuracy"] for _, r in points], marker="o")
    for t, r in points:
        ax.annotate(str(r["round"]), (t, r["eval_accuracy"]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("wall time since the run started (s)")
    ax.set_ylabel("global eval accuracy")
    ax.set_title("accuracy over time (points labelled with their round)", fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def bytes_figure(rows: list[dict[str, Any]]) -> Any:
    """Traffic per round, one panel per direction (None when no round had clients)."""
    active = [r for r in rows if r.get("clients")]
    if not active:
        return None
    up_label, down_label, per = TRAFFIC[traffic_kind(rows)]
    fig = _figure(figsize=(6.4, 5.2))
    axes = fig.subplots(2, 1, sharex=True)
    x = [r["round"] for r in active]
    for ax, key, label, color in ((axes[0], "bytes_up", up_label, "tab:blue"), (axes[1], "bytes_down", down_label, "tab:orange")):
        values = [float(r.get(key) or 0) for r in active]
        scale, unit = _unit(values)
        ax.bar(x, [v / scale for v in values], width=0.6, color=color)
        ax.set_title(label, fontsize=10, loc="left")
        ax.set_ylabel(f"{unit} {per}")
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xlabel("round")
    _integer_ticks(axes[1])
    return fig


def write_plots(rows: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    """accuracy.png, time.png and bytes.png in ``run_dir`` (those the rows have data for)."""
    if _WARMING is not None:
        _WARMING.join()
    out = []
    for name, build in (("accuracy.png", accuracy_figure), ("time.png", time_figure), ("bytes.png", bytes_figure)):
        fig = build(rows)
        if fig is None:
            continue
        path = run_dir / name
        fig.savefig(path, dpi=100)
        out.append(path)
    return out
