"""The PNG plots: the legend clear of the axes, integer round ticks, traffic per direction, accuracy by wall time."""

from __future__ import annotations

from pathlib import Path

from dpeft.rounds.plots import accuracy_figure, bytes_figure, time_figure, write_plots


def _rows(n: int = 3, **extra: object) -> list[dict]:
    rows = [
        {
            "round": 0,
            "clients": 0,
            "eval_accuracy": 0.5,
            "eval_loss": 0.7,
            "bytes_up": 0,
            "bytes_down": 0,
            "wall_s": 1.0,
            "elapsed_s": 1.0,
        }
    ]
    for k in range(1, n + 1):
        row = {"round": k, "clients": 2, "eval_accuracy": 0.5 + 0.1 * k, "eval_loss": 0.7 - 0.1 * k}
        row.update(bytes_up=3_000_000 * k, bytes_down=40_000, wall_s=2.0, elapsed_s=1.0 + 2.0 * k, **extra)
        rows.append(row)
    return rows


def test_the_legend_sits_below_the_axes_and_rounds_are_integer_ticks() -> None:
    fig = accuracy_figure(_rows(2))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = fig.legends[0].get_window_extent(renderer)
    axis_area = ax.get_tightbbox(renderer)  # the plot, its tick labels and the x label
    assert legend.y1 <= axis_area.y0 + 1, (legend, axis_area)
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all(s.lstrip("−-").isdigit() for s in labels), labels
    assert {"eval accuracy", "eval loss"} <= {t.get_text() for t in fig.legends[0].get_texts()}


def test_bytes_have_one_panel_per_direction_labelled_for_the_mode() -> None:
    fig = bytes_figure(_rows())
    up, down = fig.axes
    assert up.get_title(loc="left").startswith("up: client updates") and up.get_ylabel().startswith("MiB")
    assert down.get_title(loc="left").startswith("down: global adapter") and down.get_ylabel().startswith("KiB")
    split = bytes_figure(_rows(split_steps=4))
    assert "activations" in split.axes[0].get_title(loc="left") and "client updates" not in split.axes[0].get_title(loc="left")
    ring = bytes_figure(_rows(transport="allreduce"))
    assert "all-reduce" in ring.axes[0].get_title(loc="left")


def test_a_single_round_still_gets_whole_number_ticks() -> None:
    for fig in (bytes_figure(_rows(1)), accuracy_figure(_rows(1))):
        fig.canvas.draw()
        ax = fig.axes[-1] if len(fig.axes) == 2 and fig.axes[0].get_title(loc="left") else fig.axes[0]
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert labels and all(s.lstrip("−-").isdigit() for s in labels), labels


def test_accuracy_against_wall_time_and_the_files(tmp_path: Path) -> None:
    fig = time_figure(_rows())
    xs, ys = fig.axes[0].lines[0].get_data()
    assert list(xs) == [1.0, 3.0, 5.0, 7.0] and round(ys[-1], 4) == 0.8
    no_clock = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in _rows()]
    assert list(time_figure(no_clock).axes[0].lines[0].get_data()[0]) == [1.0, 3.0, 5.0, 7.0]
    written = write_plots(_rows(), tmp_path)
    assert [p.name for p in written] == ["accuracy.png", "time.png", "bytes.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_prewarm_imports_matplotlib_once_in_the_background_and_the_plots_still_come(tmp_path: Path) -> None:
    """In a fresh interpreter: one warm-up thread however often it is asked for, matplotlib loaded
    by it before any plot is asked for, and the plots written after it."""
    import subprocess
    import sys

    code = f"""
import sys, threading
from pathlib import Path
import dpeft.rounds.plots as plots
assert "matplotlib" not in sys.modules
plots.prewarm(); first = plots._WARMING; plots.prewarm()
assert plots._WARMING is first and first.name == "dpeft-plots-warm"
assert sum(t.name == "dpeft-plots-warm" for t in threading.enumerate()) <= 1
first.join(120)
assert "matplotlib.backends.backend_agg" in sys.modules  # loaded by the thread, before any plot is asked for
rows = [{{"round": 0, "clients": 0, "eval_accuracy": 0.5, "wall_s": 1.0, "bytes_up": 0, "bytes_down": 0}},
        {{"round": 1, "clients": 2, "eval_accuracy": 0.6, "wall_s": 1.0, "bytes_up": 10, "bytes_down": 20}}]
paths = plots.write_plots(rows, Path({str(tmp_path)!r}))
print(sorted(p.name for p in paths))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['accuracy.png', 'bytes.png', 'time.png']"
    assert all((tmp_path / n).stat().st_size > 1000 for n in ("accuracy.png", "bytes.png", "time.png"))
