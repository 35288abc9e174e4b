"""Framework overhead: `dpeft simulate` against one plain PyTorch loop doing the same work.

Both sides do the same number of local training steps on the same batches (same partition,
same per-(round, client) batch schedule), the same FedAvg, and the same number of global
evaluations. The plain loop is one process using every core (torch threads = cores); it is
the floor. Both run as fresh subprocesses in this invocation, so start-up (imports, model
and data loading) counts on both sides.

    python benchmarks/overhead.py [--quick] [--lockstep] [--grid [--before]] [key=value ...]

With ``--grid`` it runs a grid of round shapes instead (1-8 clients per round over 2 worker
processes, 3 and 5 over 4 processes on 2 cores), each against the plain loop
(:mod:`overhead_grid`); ``--before`` adds dpeft without work conservation and overlapped
evaluation to each shape.

With ``--lockstep`` the same task runs three times in this invocation, all with the base
model's dropout off (``model.dropout=0``, which lockstep training needs; the plain loop gets the
same model): dpeft with clients trained one after another, dpeft with ``train.lockstep=true``
(each worker process trains the clients it gets in a round together), and the plain loop.

Writes a section of benchmarks/RESULTS.md and prints the table.
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


def plain_loop(overrides: list[str], out: str) -> None:
    """The floor: one process, all cores, plain transformers + peft + torch.optim."""
    import torch

    from dpeft.adapters import adapter_parameters, build_model, extract_state, load_state
    from dpeft.data import load_dataset, partition, tokenize
    from dpeft.train.loop import batch_schedule, label_log_prior, task_seed
    from dpeft.validate import load_config

    t0 = time.time()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(None, overrides)
    train, test = load_dataset(cfg.data, cfg.seed)
    parts = partition(
        train.labels, cfg.clients, cfg.data.partition, cfg.seed, cfg.data.dirichlet_alpha, cfg.data.min_examples_per_client
    )
    bundle = build_model(cfg.model, cfg.adapter, len(train.label_names), cfg.seed)
    model = bundle.model
    tr = tokenize(bundle.tokenizer, train.texts, train.labels, cfg.model.max_length)
    te = tokenize(bundle.tokenizer, test.texts, test.labels, cfg.model.max_length)
    params = list(adapter_parameters(model).values())
    global_state = extract_state(model)
    import numpy as np

    # the batches dpeft evaluates: in order of length, so each is cut near its own sequences' width
    order = torch.argsort(te.attention_mask.sum(dim=1), stable=True)

    def evaluate() -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for s in range(0, len(te), cfg.train.eval_batch_size):
                b = te.batch(order[s : s + cfg.train.eval_batch_size])
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                correct += int((logits.argmax(-1) == b["labels"]).sum())
        return correct / len(te)

    accs = [evaluate()]
    steps = 0
    train_s = 0.0
    for rnd in range(1, cfg.rounds + 1):
        rng = np.random.default_rng([cfg.seed, rnd])
        sampled = sorted(int(c) for c in rng.choice(cfg.clients, size=cfg.clients_per_round, replace=False))
        acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        total = 0
        for c in sampled:
            t1 = time.time()
            load_state(model, global_state)
            model.train()
            opt = torch.optim.AdamW(params, lr=cfg.train.lr)
            prior = label_log_prior(tr.labels, parts[c], len(train.label_names)) if cfg.train.loss == "prior_calibrated" else 0.0
            for idx in batch_schedule(parts[c], cfg.train.local_steps, cfg.train.batch_size, task_seed(cfg.seed, rnd, c)):
                b = tr.batch(idx)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits + prior
                loss = torch.nn.functional.cross_entropy(logits, b["labels"])
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or 1e9)
                opt.step()
                steps += 1
            train_s += time.time() - t1
            local = extract_state(model)
            n = len(parts[c])
            for k in acc:
                acc[k] += (local[k].double() - global_state[k].double()) * n
            total += n
        for k in acc:
            global_state.tensors[k] = (global_state[k].double() + acc[k] / total).float()
        load_state(model, global_state)
        accs.append(evaluate())
    Path(out).write_text(json.dumps({"wall_s": time.time() - t0, "steps": steps, "train_s": train_s, "accuracy": accs}))


def run_dpeft(overrides: list[str], run_dir: str) -> dict:
    t0 = time.time()
    cmd = [sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh", f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"dpeft simulate failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of the default run")
    parser.add_argument(
        "--lockstep", action="store_true", help="also run dpeft with train.lockstep=true (dropout off on every side)"
    )
    parser.add_argument(
        "--grid", action="store_true", help="a grid of round shapes, each against the plain loop (overhead_grid.py)"
    )
    parser.add_argument(
        "--shapes", help="--grid: shapes to run, in order, e.g. 3x2,3x4c2 (clients x processes [c cores]); default all"
    )
    parser.add_argument(
        "--before", action="store_true", help="--grid: also dpeft with simulate.work_conserving=false eval.overlap=false"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="--grid: runs per shape (median; dpeft and the plain loop alternate)"
    )
    parser.add_argument("--plain-only", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = list(args.overrides) + (["rounds=3"] if args.quick else [])
    if args.plain_only:
        plain_loop(overrides, args.plain_only)
        return
    if args.grid:
        from overhead_grid import parse_shapes, run_grid

        shapes = parse_shapes(args.shapes) if args.shapes else None
        print(run_grid(list(args.overrides), before=args.before, shapes=shapes, repeats=max(1, args.repeats)))
        return
    if args.lockstep:
        lockstep_comparison(args, overrides + ["model.dropout=0"])
        return
    with tempfile.TemporaryDirectory() as tmp:
        dp = run_dpeft(overrides, os.path.join(tmp, "run"))
        out = os.path.join(tmp, "plain.json")
        t0 = time.time()
        subprocess.run([sys.executable, __file__, "--plain-only", out, *overrides], check=True, timeout=3600)
        plain = json.loads(Path(out).read_text())
        plain["outer_wall_s"] = time.time() - t0
    rows = [r for r in dp["rows"] if r["round"] > 0]
    framework = [r["wall_s"] - r.get("eval_s", 0.0) - r.get("client_compute_s", 0.0) / 2 for r in rows]
    ratio = dp["wall_s"] / plain["outer_wall_s"]
    from dpeft.validate import load_config

    steps_per_client = load_config(None, overrides).train.local_steps
    table = [
        "| | dpeft simulate | plain PyTorch loop (floor) | ratio |",
        "| --- | --- | --- | --- |",
        f"| wall time, start to finish | {dp['wall_s']:.1f} s | {plain['outer_wall_s']:.1f} s | **{ratio:.3f}** |",
        f"| final eval accuracy | {rows[-1]['eval_accuracy']:.4f} | {plain['accuracy'][-1]:.4f} | |",
        f"| local training steps | {sum(r['clients'] for r in rows) * steps_per_client} | {plain['steps']} | |",
        f"| mean round wall time | {sum(r['wall_s'] for r in rows) / len(rows):.2f} s | | |",
        f"| mean per-round framework time (round wall - eval - client compute / 2 processes) | {sum(framework) / len(framework):.2f} s | | |",
    ]
    text = "\n".join(
        [
            f"`python benchmarks/overhead.py {' '.join(args.overrides + (['--quick'] if args.quick else []))}`".replace(
                " `", "`"
            ),
            "",
            machine_note(),
            "",
            *table,
            "",
            "Both sides run the same batches (same partition and per-(round, client) schedule), FedAvg, and "
            "the same evaluations. dpeft runs one coordinator plus `simulate.processes` workers with "
            "`simulate.threads_per_process` threads each; the floor is one process with torch threads = cores.",
        ]
    )
    write_section("overhead", "Framework overhead: dpeft simulate vs a plain PyTorch loop", text)
    print(text)


def _plain(overrides: list[str], tmp: str) -> dict:
    out = os.path.join(tmp, "plain.json")
    t0 = time.time()
    subprocess.run([sys.executable, __file__, "--plain-only", out, *overrides], check=True, timeout=3600)
    plain = json.loads(Path(out).read_text())
    plain["outer_wall_s"] = time.time() - t0
    return plain


def lockstep_comparison(args: argparse.Namespace, overrides: list[str]) -> None:
    """dpeft sequential vs dpeft lockstep vs the plain loop, all in this invocation."""
    from dpeft.validate import load_config

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        seq = run_dpeft(overrides + ["train.lockstep=false"], os.path.join(tmp, "seq"))
        lock = run_dpeft(overrides + ["train.lockstep=true"], os.path.join(tmp, "lock"))
        plain = _plain(overrides, tmp)
    load_end = os.getloadavg()[0]
    cfg = load_config(None, overrides)
    floor = plain["outer_wall_s"]

    def rows_of(run: dict) -> list[dict]:
        return [r for r in run["rows"] if r["round"] > 0]

    def train_s(run: dict) -> float:
        return sum(r.get("client_compute_s", 0.0) for r in rows_of(run))

    table = [
        "| | dpeft, clients one after another | dpeft, `train.lockstep=true` | plain PyTorch loop (floor) |",
        "| --- | --- | --- | --- |",
        f"| wall time, start to finish | {seq['wall_s']:.1f} s | {lock['wall_s']:.1f} s | {floor:.1f} s |",
        f"| ratio to the plain loop | **{seq['wall_s'] / floor:.3f}** | **{lock['wall_s'] / floor:.3f}** | 1 |",
        f"| mean round wall time | {sum(r['wall_s'] for r in rows_of(seq)) / len(rows_of(seq)):.2f} s "
        f"| {sum(r['wall_s'] for r in rows_of(lock)) / len(rows_of(lock)):.2f} s | |",
        f"| client training time, summed over clients | {train_s(seq):.1f} s | {train_s(lock):.1f} s | {plain['train_s']:.1f} s |",
        f"| updates trained in lockstep | 0 | {sum(r.get('lockstep_updates', 0) for r in rows_of(lock))} | |",
        f"| final eval accuracy | {rows_of(seq)[-1]['eval_accuracy']:.4f} | {rows_of(lock)[-1]['eval_accuracy']:.4f} | {plain['accuracy'][-1]:.4f} |",
        f"| local training steps | {sum(r['clients'] for r in rows_of(seq)) * cfg.train.local_steps} "
        f"| {sum(r['clients'] for r in rows_of(lock)) * cfg.train.local_steps} | {plain['steps']} |",
    ]
    busy = max(load_start, load_end) > (os.cpu_count() or 1)
    flags = " ".join(["--lockstep", *(["--quick"] if args.quick else []), *args.overrides])
    text = "\n".join(
        [
            f"`python benchmarks/overhead.py {flags}`",
            "",
            machine_note()
            + f" 1-min load average {load_start:.1f} at the start, {load_end:.1f} at the end"
            + (
                " (high: other work shared the cores, so every time here is inflated; the three runs were back to back, "
                "and the floor suffers most: its torch threads synchronise on every op, so one stolen core stalls them all, "
                "which pushes both ratios down)."
                if busy
                else "."
            ),
            "",
            *table,
            "",
            f"{cfg.rounds} rounds, {cfg.clients_per_round} of {cfg.clients} clients per round, {cfg.train.local_steps} local steps of batch "
            f"{cfg.train.batch_size}, max_length {cfg.model.max_length}; `simulate.processes={cfg.simulate.processes}` workers "
            f"with {cfg.simulate.threads_per_process} torch thread(s) each, so a worker process gets about "
            f"{cfg.clients_per_round / cfg.simulate.processes:g} clients per round to train together. The base model's dropout is "
            "off on all three sides (lockstep needs it). Client training time is the workers' `compute_s` (a lockstep group "
            "reports its time split evenly over its clients).",
        ]
    )
    write_section("overhead_lockstep", "Framework overhead with clients trained in lockstep", text)
    print(text)


if __name__ == "__main__":
    main()
