"""Run outputs a person looks at: metrics.jsonl, live progress, a summary table, PNG plots (:mod:`dpeft.rounds.plots`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

COLUMNS = [
    ("round", "round", "{}"),
    ("clients", "clients", "{}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("eval_loss", "eval loss", "{:.4f}"),
    ("eval_accuracy", "eval acc", "{:.4f}"),
    ("bytes_up", "up", None),
    ("bytes_down", "down", None),
    ("rejected", "rejected", "{}"),
    ("wall_s", "wall s", "{:.1f}"),
]
#: columns shown only when some row has them (language models), after ``eval acc``
OPTIONAL_COLUMNS = [
    ("eval_perplexity", "eval ppl", "{:.5g}"),
    ("gen_accuracy", "gen acc", "{:.4f}"),
]


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cell(row: dict[str, Any], key: str, fmt: str | None) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if fmt is None:
        return human_bytes(value)
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


#: shown after ``eval acc`` when a run has federated evaluation (``eval.federated``)
FED_COLUMN = ("fed_eval_accuracy", "fed acc", "{:.4f}")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the per-round metrics; optional columns (perplexity, generation accuracy,
    the clients' accuracy under federated evaluation) appear when some row has them."""
    at = next(i for i, c in enumerate(COLUMNS) if c[0] == "eval_accuracy") + 1
    extra = [c for c in [*OPTIONAL_COLUMNS, FED_COLUMN] if any(r.get(c[0]) is not None for r in rows)]
    columns = COLUMNS[:at] + extra + COLUMNS[at:]
    header = [title for _, title, _ in columns]
    body = [[_cell(r, k, f) for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=False))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line, sep] + ["  ".join(c.rjust(w) for c, w in zip(b, widths, strict=False)) for b in body])


class MetricsLog:
    """Appends one JSON object per round and prints progress."""

    def __init__(self, run_dir: Path, stream: TextIO | None = None, total_rounds: int = 0) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        self.stream = stream or sys.stderr
        self.total_rounds = total_rounds
        #: the checkpointed round this process resumed from (None: it started at round 0)
        self.resumed_from: int | None = None
        #: why the run stopped before its planned rounds (printed with the summary); None: it did not
        self.stop_note: str | None = None
        self.rows: list[dict[str, Any]] = []
        #: experiment tracking (:class:`dpeft.rounds.tracking.Tracker`): every appended row, the end of the run
        self.tracker: Any = None
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        break

    def truncate_after(self, round_num: int) -> None:
        """On resume: forget rows past the checkpointed round (they will be redone)."""
        self.rows = [r for r in self.rows if r.get("round", 0) <= round_num]
        self.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
        if self.tracker is not None:
            self.tracker.log_row(row)
        self._print_row(row)

    def _print_row(self, row: dict[str, Any]) -> None:
        acc = row.get("eval_accuracy")
        parts = [
            f"round {row['round']}/{self.total_rounds}",
            f"clients {row.get('clients', 0)}",
            f"loss {row['train_loss']:.4f}" if row.get("train_loss") is not None else "loss -",
            f"acc {acc:.4f}" if acc is not None else "acc -",
            *([f"gen acc {row['gen_accuracy']:.4f}"] if row.get("gen_accuracy") is not None else []),
            *([f"fed acc {row['fed_eval_accuracy']:.4f}"] if row.get("fed_eval_accuracy") is not None else []),
            f"up {human_bytes(row.get('bytes_up', 0))}",
            f"down {human_bytes(row.get('bytes_down', 0))}",
            f"{row.get('wall_s', 0):.1f}s",
        ]
        self.progress_done()
        print("  ".join(parts), file=self.stream, flush=True)

    def progress(self, text: str) -> None:
        """An in-place status line on a terminal (nothing when output is not a TTY)."""
        if self.stream.isatty():
            print("\r\033[K" + text, end="", file=self.stream, flush=True)

    def progress_done(self) -> None:
        if self.stream.isatty():
            print("\r\033[K", end="", file=self.stream, flush=True)

    def summary(self) -> str:
        return format_table(self.rows)

    def print_summary(self, rows: list[dict[str, Any]], t_start: float) -> None:
        """The end-of-run table, the plots, and one line saying where everything is."""
        import time

        self.progress_done()
        print("\n" + format_table(rows), file=self.stream)
        plots = self.plot()
        if self.tracker is not None:
            self.tracker.finish(plots)
        final = [r for r in rows if r.get("eval_accuracy") is not None]
        acc = f"final eval accuracy {final[-1]['eval_accuracy']:.4f}; " if final else ""
        gen = [r for r in rows if r.get("gen_accuracy") is not None]
        if gen:
            g0, g1 = gen[0], gen[-1]
            acc += f"generation accuracy {g0['gen_accuracy']:.4f} (round {g0['round']}) -> {g1['gen_accuracy']:.4f}; "
        first = self.resumed_from or 0  # rounds up to here ran in an earlier process
        ran = sum(1 for r in rows if r.get("round", 0) > first)
        resumed = f" by this process (resumed from round {first})" if self.resumed_from is not None else ""
        if self.stop_note:
            print(f"\nstopped early: {self.stop_note}", file=self.stream)
        print(
            f"\n{acc}{ran} round{'' if ran == 1 else 's'} in {time.time() - t_start:.1f}s{resumed}; adapter: {self.run_dir / 'adapter'}; "
            f"metrics: {self.path}; plots: {', '.join(p.name for p in plots)}",
            file=self.stream,
        )

    def plot(self) -> list[Path]:
        """accuracy.png, time.png and bytes.png next to metrics.jsonl (:mod:`dpeft.rounds.plots`)."""
        from dpeft.rounds.plots import write_plots

        return write_plots(self.rows, self.run_dir)
