"""PEFT families on the default task: parameters, bytes per round, accuracy and time per round.

Runs ``dpeft simulate`` once per adapter method (same seed, so the same clients, batches and
rounds; only ``adapter.method`` differs) on the default task (MiniLM, Rotten Tomatoes) with
fewer rounds, and reads ``metrics.jsonl``. Trainable and exchanged parameters are counted on
the built model (what requires a gradient; what a client uploads).

    python benchmarks/methods.py [--rounds 3] [--only lora,loreft] [--table adapters|strategies|all] [key=value ...]

``--table strategies`` runs the strategies table of ``benchmarks/methods_strategies.py``
(its ``main(argv)``, with the remaining arguments); ``all`` runs both, passing the remaining
arguments to each (so use options both accept, such as ``--rounds``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results import machine_note, write_section  # noqa: E402

#: (row name, overrides)
SETTINGS = [
    ("lora", ["adapter.method=lora"]),
    ("dora", ["adapter.method=dora"]),
    ("ia3", ["adapter.method=ia3"]),
    ("loreft", ["adapter.method=loreft"]),
    ("loreft f1+l1", ["adapter.method=loreft", "adapter.options={positions: f1+l1}"]),
    ("direft", ["adapter.method=direft"]),
    ("houlsby", ["adapter.method=houlsby"]),
    ("pfeiffer", ["adapter.method=pfeiffer"]),
]


def count_parameters(overrides: list[str]) -> tuple[int, int]:
    """(trainable parameters, exchanged parameters) of the model the run config builds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dpeft.adapters import build_model, extract_state
    from dpeft.validate import load_config

    cfg = load_config(None, overrides)
    model = build_model(cfg.model, cfg.adapter, 2, cfg.seed).model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, extract_state(model).numel()


def run(overrides: list[str], run_dir: str) -> tuple[list[dict], float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh", f"run_dir={run_dir}", *overrides],
        capture_output=True, text=True, timeout=3600, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"dpeft simulate {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return rows, time.time() - t0


def adapters_table(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="comma-separated row names to run")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    base = [f"rounds={args.rounds}", *args.overrides]
    settings = [s for s in SETTINGS if not args.only or s[0] in args.only.split(",")]
    load0, t_start = os.getloadavg()[0], time.time()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(settings):
            trainable, exchanged = count_parameters([*base, *extra])
            rows, wall = run([*base, *extra], os.path.join(tmp, f"run{i}"))
            trained = [r for r in rows if r["round"] > 0]
            up = sum(r["bytes_up"] for r in trained) / len(trained)
            down = sum(r["bytes_down"] for r in trained) / len(trained)
            clients = sum(r["clients"] for r in trained) / len(trained)
            round_s = sum(r["wall_s"] - r.get("eval_s", 0.0) for r in trained) / len(trained)
            acc = [r.get("eval_accuracy") for r in rows]
            loss = rows[-1].get("eval_loss", float("nan"))
            results.append((name, trainable, exchanged, up, down, clients, acc, round_s, wall, loss))
            print(
                f"{name}: {trainable:,} trainable, up {up:,.0f} B/round, acc {acc[-1]:.4f}, {round_s:.1f} s/round, {wall:.0f}s",
                flush=True,
            )
    lora = next((r for r in results if r[0] == "lora"), results[0])
    table = [
        "| method | trainable params | exchanged params | vs LoRA | bytes up / round | per client update | bytes down / round | "
        f"accuracy after {args.rounds} rounds | Δ vs LoRA (points) | accuracy per round | eval loss | s / round (no eval) | vs LoRA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, trainable, exchanged, up, down, clients, acc, round_s, _wall, loss in results:
        table.append(
            f"| {name} | {trainable:,} | {exchanged:,} | {exchanged / lora[2]:.2f}x | {up:,.0f} | {up / clients:,.0f} | {down:,.0f} | "
            f"{acc[-1]:.4f} | {(acc[-1] - lora[6][-1]) * 100:+.1f} | {' '.join('-' if a is None else f'{a:.3f}' for a in acc)} | {loss:.4f} | {round_s:.1f} | {round_s / lora[7]:.2f}x |"
        )
    total = (time.time() - t_start) / 60
    text = "\n".join(
        [
            f"`python benchmarks/methods.py {' '.join(argv)}`".replace(" `", "`"),
            "",
            machine_note() + f" 1-min load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
            f"(the machine is shared with other jobs: times are noisy). Total {total:.1f} min.",
            "",
            f"Task: `dpeft simulate {' '.join(base)} adapter.method=...` (the default task otherwise: MiniLM, Rotten Tomatoes, "
            "Dirichlet(1.0) over 10 clients, 4 per round, batch 16, lr 2e-3, FedAvg). "
            "Every run has the same seed, so the same clients and batches; only the adapter differs, each with dpeft's defaults "
            "(LoRA/DoRA r=8 alpha 16 on query/value; IA3 on query/value; LoReFT/DiReFT r=8 on every layer's output, all tokens "
            "unless the row says f1+l1; Houlsby/Pfeiffer reduction factor 16, ReLU, every layer). Every method trains and "
            "exchanges the classifier head too (770 parameters). Bytes are measured on the wire (fp32 deltas).",
            "",
            *table,
            "",
            "One learning rate for all methods (the default task's, tuned for LoRA): a method that wants another lr is "
            "at a disadvantage here, so read the accuracy column as 'with the defaults', not as each method's best.",
        ]
    )
    if not args.no_write:
        write_section("methods", "Methods: PEFT families", text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    table = "adapters"
    if "--table" in argv:
        at = argv.index("--table")
        if at + 1 >= len(argv) or argv[at + 1] not in ("adapters", "strategies", "all"):
            raise SystemExit("--table takes adapters, strategies or all")
        table = argv[at + 1]
        del argv[at : at + 2]
    if table in ("adapters", "all"):
        adapters_table(argv)
    if table in ("strategies", "all"):
        try:
            import methods_strategies  # the strategies table (its own script), imported only when asked for
        except ImportError as exc:
            raise SystemExit(f"--table strategies needs benchmarks/methods_strategies.py: {exc}") from None
        return int(methods_strategies.main(argv) or 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
