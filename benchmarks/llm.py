"""Fine-tuning a causal LM: dpeft simulate's tokens/s and memory against a plain loop, and
dpeft's shared base against the FlowerTune pattern (the base rebuilt for every client, every round).

    python benchmarks/llm.py [--variants fp32,bf16,nf4] [--device cpu|cuda] [--reload-clients 4]
                             [--reload-variant fp32] [--define NAME:key=value,key=value] [key=value ...]

(a) For each variant (a named set of config overrides: ``fp32`` is the task as given, ``bf16`` adds
``train.precision=bf16``, ``nf4`` adds ``model.quantization=nf4``, ...), ``dpeft simulate`` runs the
embedded LLM task (SmolLM2-135M-Instruct, LoRA on q/v, causal LM loss) and then the floor, one
process with plain transformers + peft + torch.optim doing the same rounds, clients, batches and
FedAvg with as many torch threads as dpeft's workers have together (``benchmarks/llm_loops.py``).
Tokens/s = real (non-padding) tokens trained / the rounds' time without evaluation (dpeft: the
rounds' ``wall_s - eval_s``, transfers and aggregation included; the floor: its round loop).
Memory: RSS and PSS summed over the process tree (psutil, children included), sampled, peak;
on a GPU, the tree's GPU memory (nvidia-smi per process, CUDA contexts included) and the floor's
``torch.cuda.max_memory_allocated``; the base model's footprint (parameters and buffers).

(b) FlowerTune's client ``train()`` builds the (4-bit) base model and tokenizer each time it is
called; dpeft loads it once per worker process. Per-round time of that pattern (a pool of as many
processes and threads as dpeft's workers, ``llm_loops.py reload``) against dpeft's rounds
(``wall_s - eval_s``) at ``--reload-clients`` clients per round, the same sampled clients.

A variant whose config keys this dpeft does not have is reported as ``skipped: <config error>``;
a run that fails is reported with the last line of its error. Writes the ``llm`` section of
benchmarks/RESULTS.md (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gpu_check import config_problem  # noqa: E402
from results import machine_note, write_section  # noqa: E402

#: the task: full SmolLM2 (30 layers), short sequences, few steps; fits 2 CPU cores in minutes
DEFAULTS = [
    "model.name=smollm2",
    "model.task=causal_lm",
    "model.max_length=32",
    "rounds=2",
    "clients=8",
    "clients_per_round=4",
    "train.local_steps=4",
    "train.batch_size=4",
    "train.lr=1e-4",
    "data.max_train_examples=2000",
    "data.test_examples=16",
    "data.partition=dirichlet",
    "eval.generate=false",
]

VARIANTS: dict[str, list[str]] = {
    "fp32": [],
    "bf16": ["train.precision=bf16"],
    "fp16": ["train.precision=fp16"],
    "nf4": ["model.quantization=nf4"],
    "nf4-bf16": ["model.quantization=nf4", "train.precision=bf16"],
    "fp4": ["model.quantization=fp4"],
    "int8": ["model.quantization=int8"],
}


class TreeSampler:
    """Peak RSS, PSS (and GPU memory per nvidia-smi) summed over a process and its descendants."""

    def __init__(self, pid: int, interval_s: float = 0.5, gpu: bool = False) -> None:
        self.pid, self.interval_s, self.gpu = pid, interval_s, gpu
        self.peak_rss = self.peak_pss = self.peak_gpu = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pids(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _run(self) -> None:
        while not self._stop.is_set():
            procs, rss, pss = self._pids(), 0, 0
            for p in procs:
                try:
                    info = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss, pss = rss + info.rss, pss + info.pss
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            if self.gpu:
                self.peak_gpu = max(self.peak_gpu, gpu_bytes({p.pid for p in procs}))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def gpu_bytes(pids: set[int]) -> int:
    """GPU memory used by ``pids`` now (nvidia-smi's per-process accounting; 0 without it)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    total = 0
    for line in out.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[0] and int(parts[0]) in pids and parts[1].isdigit():
            total += int(parts[1]) << 20
    return total


def gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def run_measured(cmd: list[str], gpu: bool, timeout: float) -> tuple[subprocess.CompletedProcess, float, TreeSampler]:
    t0 = time.time()
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
    with TreeSampler(proc.pid, gpu=gpu) as sampler:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += f"\ntimed out after {timeout:.0f} s"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.time() - t0, sampler


def last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:300]


def run_dpeft(overrides: list[str], tmp: str, name: str, gpu: bool, timeout: float) -> dict[str, Any]:
    run_dir = os.path.join(tmp, f"dpeft-{name}")
    cmd = [sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh", f"run_dir={run_dir}", *overrides]
    proc, wall, mem = run_measured(cmd, gpu, timeout)
    if proc.returncode != 0:
        return {"error": f"dpeft simulate failed: {last_error(proc.stderr)}"}
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["round"] > 0]
    return {
        "wall_s": wall,
        "rounds_s": [r["wall_s"] - r.get("eval_s", 0.0) for r in rows],
        "sampled": [r["sampled"] for r in rows],
        "compute_s": [r.get("client_compute_s", 0.0) for r in rows],
        "rss": mem.peak_rss,
        "pss": mem.peak_pss,
        "gpu": mem.peak_gpu,
    }


def run_loop(
    mode: str, overrides: list[str], sampled: list[list[int]], tmp: str, name: str, gpu: bool, timeout: float
) -> dict[str, Any]:
    spec, out = os.path.join(tmp, f"{mode}-{name}.json"), os.path.join(tmp, f"{mode}-{name}.out.json")
    Path(spec).write_text(json.dumps({"overrides": overrides, "sampled": sampled}))
    proc, wall, mem = run_measured([sys.executable, str(HERE / "llm_loops.py"), mode, spec, out], gpu, timeout)
    if proc.returncode != 0:
        return {"error": f"{mode} loop failed: {last_error(proc.stderr)}"}
    result = json.loads(Path(out).read_text())
    result.update(outer_wall_s=wall, rss=mem.peak_rss, pss=mem.peak_pss, gpu=mem.peak_gpu)
    return result


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n else "-"


def throughput_rows(results: dict[str, dict[str, Any]], gpu: bool, processes: int) -> list[str]:
    head = "| variant | side | tokens/s (rounds, no eval) | vs floor | round time s (mean) | dpeft's own s / round | wall s | peak RSS, tree | peak PSS, tree | base footprint | footprint vs fp32 |"
    if gpu:
        head += " GPU mem, tree (nvidia-smi) | floor max_memory_allocated |"
    cols = head.count("|") - 1
    lines = [head, "|" + " --- |" * cols]
    fp32_foot = results.get("fp32", {}).get("floor", {}).get("footprint_bytes")
    for name, res in results.items():
        if "skipped" in res or "error" in res:
            why = f"skipped: {res['skipped']}" if "skipped" in res else res["error"]
            lines.append(f"| {name} | {why} |" + " |" * (cols - 2))
            continue
        dp, fl = res["dpeft"], res["floor"]
        tokens = fl["tokens"]
        fl_tps = tokens / sum(fl["rounds_s"])
        dp_tps = tokens / sum(dp["rounds_s"])
        foot = fl["footprint_bytes"]
        foot_ratio = f"**{foot / fp32_foot:.3f}**" if fp32_foot else "-"
        for side, tps, run, ratio in (
            ("dpeft simulate", dp_tps, dp, f"**{dp_tps / fl_tps:.3f}**"),
            ("plain loop (floor)", fl_tps, fl, "1"),
        ):
            wall = run.get("wall_s") if side.startswith("dpeft") else run["outer_wall_s"]
            own = (
                ""
                if "compute_s" not in run
                else f"{(sum(run['rounds_s']) - sum(run['compute_s']) / processes) / len(run['rounds_s']):.2f}"
            )
            row = (
                f"| {name} | {side} | {tps:,.0f} | {ratio} | {sum(run['rounds_s']) / len(run['rounds_s']):.2f} | {own} | {wall:.1f} "
                f"| {mib(run['rss'])} | {mib(run['pss'])} | {mib(foot)} | {foot_ratio} |"
            )
            if gpu:
                row += f" {mib(run['gpu'])} | {mib(fl.get('cuda_max_allocated', 0)) if side.startswith('plain') else ''} |"
            lines.append(row)
    return lines


def reload_rows(reloads: dict[int, dict[str, Any]]) -> list[str]:
    lines = [
        "| clients per round | dpeft shared base: s / round | FlowerTune pattern (rebuild per client): s / round | model builds: mean s | ratio (rebuild / shared) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for k, res in reloads.items():
        if "error" in res:
            lines.append(f"| {k} | {res['error']} | | | |")
            continue
        dp, rl = res["dpeft"], res["reload"]
        dp_round, rl_round = sum(dp["rounds_s"]) / len(dp["rounds_s"]), sum(rl["rounds_s"]) / len(rl["rounds_s"])
        build = sum(rl["build_s"]) / len(rl["build_s"])
        lines.append(f"| {k} | {dp_round:.2f} | {rl_round:.2f} | {build:.2f} | **{rl_round / dp_round:.2f}x** |")
    return lines


def target_rows(results: dict[str, dict[str, Any]], reloads: dict[int, dict[str, Any]]) -> list[str]:
    """The three targets, each with the measured value or why there is none."""

    def tps_ratio(name: str) -> str:
        res = results.get(name, {})
        if "dpeft" not in res or "floor" not in res:
            return res.get("skipped") and f"skipped: {res['skipped']}" or res.get("error", "not run")
        return f"{sum(res['floor']['rounds_s']) / sum(res['dpeft']['rounds_s']):.3f}"

    fp32 = results.get("fp32", {}).get("floor", {}).get("footprint_bytes")
    four = [n for n in results if n.startswith(("nf4", "fp4")) and "floor" in results[n]]
    foot = (
        ", ".join(f"{n}: {results[n]['floor']['footprint_bytes'] / fp32:.3f}" for n in four) if fp32 and four else "no 4-bit run"
    )
    rel = reloads.get(4, {})
    if "reload" in rel:
        dp, rl = rel["dpeft"]["rounds_s"], rel["reload"]["rounds_s"]
        reload = f"{(sum(rl) / len(rl)) / (sum(dp) / len(dp)):.2f}x"
    else:
        reload = rel.get("error", "not run")
    return [
        "| target | measured |",
        "| --- | --- |",
        "| dpeft tokens/s >= 0.95x the plain loop's | "
        + "; ".join(f"{n}: {tps_ratio(n)}" for n in results if "floor" in results[n] or n == "fp32")
        + " |",
        f"| a 4-bit base <= 0.35x the fp32 base's memory (footprint) | {foot} |",
        f"| shared base >= 2x faster per round than rebuilding it per client, 4 clients per round | {reload} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants", default="fp32", help="comma-separated variant names (built in: " + ", ".join(VARIANTS) + ")"
    )
    parser.add_argument("--define", action="append", default=[], metavar="NAME:k=v,k=v", help="define a variant by its overrides")
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N (sets train.device and eval.device where this dpeft has them)"
    )
    parser.add_argument(
        "--reload-clients",
        default="4",
        help="clients per round of the FlowerTune-pattern comparison (comma-separated; '' = skip)",
    )
    parser.add_argument("--reload-variant", default="fp32", help="the variant the FlowerTune-pattern comparison uses")
    parser.add_argument(
        "--gguf", action="store_true", help="load the embedded GGUF file in every run instead of a safetensors copy of it"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not write RESULTS.md")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every run (after the defaults)")
    args = parser.parse_args()
    variants = dict(VARIANTS)
    for d in args.define:
        name, _, kv = d.partition(":")
        variants[name] = [x for x in kv.split(",") if x]
    from dpeft.config.schema import TrainConfig

    base = [*DEFAULTS, *args.overrides]
    if "device" in {f.name for f in dataclasses.fields(TrainConfig)} or args.device != "cpu":
        base += [f"train.device={args.device}", f"eval.device={args.device}"]
    gpu = args.device.startswith("cuda")
    names = [v for v in args.variants.split(",") if v]
    reload_ks = [int(k) for k in args.reload_clients.split(",") if k]
    load_start = os.getloadavg()[0]
    t_start = time.time()
    results: dict[str, dict[str, Any]] = {}
    reloads: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.gguf and not any(o.startswith(("model.path=", "model.name=")) for o in args.overrides):
            base.append(f"model.path={export_model(tmp)}")
        for name in dict.fromkeys([*names, *([args.reload_variant] if reload_ks else [])]):
            if name not in variants:
                raise SystemExit(f"unknown variant {name!r} (known: {', '.join(variants)}; add one with --define)")
            overrides = base + variants[name]
            problem = config_problem(overrides)
            if problem:
                results[name] = {"skipped": problem}
                continue
            print(f"[llm] {name}: dpeft simulate", file=sys.stderr, flush=True)
            dp = run_dpeft(overrides, tmp, name, gpu, args.timeout)
            if "error" in dp:
                results[name] = dp
                continue
            res: dict[str, Any] = {"dpeft": dp}
            if name in names:
                print(f"[llm] {name}: plain loop", file=sys.stderr, flush=True)
                fl = run_loop("floor", overrides, dp["sampled"], tmp, name, gpu, args.timeout)
                res = {"error": fl["error"]} if "error" in fl else {"dpeft": dp, "floor": fl}
            results[name] = res
        for k in reload_ks:
            reloads[k] = reload_comparison(
                k, base + variants.get(args.reload_variant, []), results.get(args.reload_variant, {}), tmp, gpu, args.timeout
            )
    report(args, base, names, results, reloads, gpu, load_start, time.time() - t_start)


def export_model(tmp: str) -> str:
    """The embedded SmolLM2 saved once as a Hugging Face directory (safetensors), as a user's model would be."""
    out = os.path.join(tmp, "smollm2-hf")
    print(f"[llm] exporting the embedded SmolLM2 to {out}", file=sys.stderr, flush=True)
    proc = subprocess.run(
        [sys.executable, str(HERE / "llm_loops.py"), "export", out, os.path.join(tmp, "export.json")],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"exporting SmolLM2 failed: {last_error(proc.stderr)}")
    return out


def reload_comparison(
    k: int, overrides: list[str], variant: dict[str, Any], tmp: str, gpu: bool, timeout: float
) -> dict[str, Any]:
    """dpeft's rounds at ``k`` clients per round (the variant's run when it has k) against the reload pattern."""
    from dpeft.validate import load_config

    if "skipped" in variant:
        return {"error": "skipped: " + variant["skipped"]}
    cfg = load_config(None, overrides)
    dp = variant.get("dpeft") if cfg.clients_per_round == k else None
    overrides = [*overrides, f"clients_per_round={k}", *([f"clients={k}"] if cfg.clients < k else [])]
    if dp is None:
        print(f"[llm] {k} clients per round: dpeft simulate", file=sys.stderr, flush=True)
        dp = run_dpeft(overrides, tmp, f"reload{k}", gpu, timeout)
        if "error" in dp:
            return dp
    print(f"[llm] {k} clients per round: FlowerTune pattern", file=sys.stderr, flush=True)
    rl = run_loop("reload", overrides, dp["sampled"], tmp, f"reload{k}", gpu, timeout)
    return {"error": rl["error"]} if "error" in rl else {"dpeft": dp, "reload": rl}


def report(
    args: argparse.Namespace,
    base: list[str],
    names: list[str],
    results: dict[str, dict[str, Any]],
    reloads: dict[int, dict[str, Any]],
    gpu: bool,
    load_start: float,
    total_s: float,
) -> None:
    from dpeft.validate import load_config

    cfg = load_config(None, base)
    load_end = os.getloadavg()[0]
    note = machine_note()
    name = gpu_name()
    if name:
        note = note.replace("no GPU.", f"GPU: {name}.")
    flags = " ".join(
        [
            f"--variants {args.variants}",
            *(f"--define {d}" for d in args.define),
            *(["--device", args.device] if args.device != "cpu" else []),
            f"--reload-clients {args.reload_clients}" if args.reload_clients != "4" else "",
            f"--reload-variant {args.reload_variant}" if args.reload_variant != "fp32" else "",
            *args.overrides,
        ]
    ).split()
    busy = max(load_start, load_end) > (os.cpu_count() or 1)
    threads = cfg.simulate.processes * cfg.simulate.threads_per_process
    text = "\n".join(
        [
            f"`python benchmarks/llm.py {' '.join(flags)}`",
            "",
            note
            + f" 1-min load average {load_start:.1f} at the start, {load_end:.1f} at the end"
            + (
                " (other work shared the cores: times are inflated, and runs made minutes apart saw different load, so a "
                "ratio of two runs can be off either way; dpeft's own time per round is measured within one run)."
                if busy
                else "."
            )
            + f" Total {total_s / 60:.1f} min.",
            "",
            f"Task: {cfg.model.name} ({f'first {cfg.model.layers} layers' if cfg.model.layers else 'all layers'}), causal LM, LoRA r={cfg.adapter.r} on "
            f"{cfg.adapter.target_modules or 'q_proj/v_proj'}, {cfg.data.dataset} ({cfg.data.partition} over {cfg.clients} clients), "
            f"{cfg.rounds} rounds x {cfg.clients_per_round} clients x {cfg.train.local_steps} steps of batch {cfg.train.batch_size} "
            f"x at most {cfg.model.max_length} tokens; dpeft: `simulate.processes={cfg.simulate.processes}` x "
            f"{cfg.simulate.threads_per_process} thread(s), the floor: 1 process x {threads} threads. Overrides: `{' '.join(base)}`.",
            "",
            *target_rows(results, reloads),
            "",
            *throughput_rows(results, gpu, cfg.simulate.processes),
            "",
            "Tokens are the real (non-padding) tokens of the batches trained, the same on both sides (same clients, batch "
            "schedules and steps); the time is the rounds' without evaluation (dpeft: `wall_s - eval_s` of each round: "
            "dispatch, training, upload, aggregation; the floor: its training and FedAvg). dpeft's own time per round is "
            "that minus the workers' training time (`client_compute_s`) / processes: what the framework adds, measured "
            "within one run, so other load on the machine moves it less than the ratio of two runs. RSS sums count pages shared "
            "between dpeft's coordinator and its forked workers (the base model) once per process; PSS splits them. The "
            "base footprint is the model's parameters and buffers (`get_memory_footprint`, LoRA included).",
        ]
    )
    if reloads:
        text += "\n\n" + "\n".join(
            [
                f"FlowerTune pattern vs dpeft's shared base ({args.reload_variant}): time per round without evaluation, "
                "the same sampled clients and steps; the pattern runs its clients in a pool of "
                f"{cfg.simulate.processes} processes x {cfg.simulate.threads_per_process} thread(s), each client building "
                "the base model and tokenizer from disk (as FlowerTune's client `train()` does every round).",
                "",
                *reload_rows(reloads),
            ]
        )
    if not args.no_write:
        write_section("llm", "Fine-tuning a causal LM: dpeft vs a plain loop, shared base vs the FlowerTune pattern", text)
    print(text)


if __name__ == "__main__":
    main()
