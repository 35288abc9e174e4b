"""How far can choosing which LoRA modules train go? Kill-and-Revive's accuracy with an oracle choice.

Kill-and-Revive trains k of the M LoRA modules at a time; the edge's traffic and compute follow
from which ones. This benchmark asks what the *choice* can reach, independently of how a real
rule estimates it, by training the whole model in one process (the same model, adapter, data,
batches and held-out set as ``benchmarks/dlora.py``; base in eval mode as split mode runs it)
and letting only the chosen modules' factors (and the head) take optimizer steps:

- ``all``: every module trains (DLoRA without KR);
- ``gradient``: every ``window`` steps, the k modules whose window-mean gradient has the
  largest L1 norm (the first-order loss decrease per step of a sign-like Adam update) train
  next. The gradients of *every* module are computed at every step: information that a split
  edge does not have for killed modules (it never sees their activations), so this is an upper
  bound for rules that rank modules by their gradient, the Gauss-Southwell choice. Every
  module trains in the first window;
- ``cyclic``: the modules take turns, k at a time, top layer first, ``window`` steps each (every
  module gets trained, none is chosen by a score).

Edge cost is counted as split mode counts it (``dpeft.split.edge``'s FLOP formulas; bytes: the
embedded tokens, and per active layer the shared input x, one output and one output gradient
per active module, and x's gradient when an active layer lies below; fp32), so the savings are
comparable with ``dlora.py``'s tables. Every run trains to the step cap and is evaluated every
``eval_every`` steps; the plateau is the first best evaluation.

    python benchmarks/kr_bound.py [--skip-minilm] [--skip-smollm2] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from dlora_plateau import evaluate  # noqa: E402
from results import machine_note, write_section  # noqa: E402


def step_cost(sites, active: set[int], batch: int, width: int, hidden: int, head: tuple[int, int]) -> tuple[float, float]:
    """(edge FLOPs, bytes) of one DLoRA training step with ``active`` modules."""
    from dpeft.split.edge import head_flops, lora_flops

    tokens = batch * width
    act = 4 * tokens  # bytes per float32 feature of every token
    layers: dict[str, list[int]] = {}
    for s in sites:
        if s.index in active:
            layers.setdefault(s.key.rsplit(".", 1)[0], []).append(s.index)  # the modules of one layer share x
    order = sorted(layers, key=lambda k: min(layers[k]))
    flops = float(head_flops(batch, head[0], head[1], True))
    nbytes = float(act * hidden + 2 * 4 * batch * head[0])  # embedded tokens; features and their gradient
    for n, key in enumerate(order):
        below = n > 0  # an active layer below needs this layer's input gradient
        members = [sites[i] for i in layers[key]]
        nbytes += act * members[0].in_features * (2 if below else 1)
        for s in members:
            nbytes += 2 * act * s.out_features
            flops += lora_flops(tokens, s.r, s.in_features, s.out_features, True, below)
    return flops, nbytes


def run_rule(bundle, data, test_data, schedule, lr: float, rule: str, k: int, window: int, eval_every: int, label: str):
    import copy

    from dpeft.adapters import adapter_parameters
    from dpeft.config import TrainConfig
    from dpeft.split.spec import lora_sites
    from dpeft.train.loop import make_optimizer

    model = copy.deepcopy(bundle.model)
    model.eval()
    params = adapter_parameters(model)
    cfg = TrainConfig(loss="cross_entropy", lr=lr)
    opt = make_optimizer(params.values(), cfg)
    sites = lora_sites(model)
    factors = [[s.module.lora_A["default"].weight, s.module.lora_B["default"].weight] for s in sites]
    m = len(sites)
    hidden = int(model.get_input_embeddings().weight.shape[1])
    head_shape = (hidden, 2)  # the classifier over the pooled feature
    order = sorted(range(m), key=lambda i: -i)  # top layer first
    active = set(order[:k]) if rule == "cyclic" else set(range(m))
    sums: list[torch.Tensor | None] = [None] * m
    n = 0
    flops = nbytes = act_sum = 0.0
    points = []
    t0 = time.time()
    for t, idx in enumerate(schedule, 1):
        b = data.batch(idx)
        f, by = step_cost(sites, active, *b["input_ids"].shape, hidden, head_shape)
        flops, nbytes, act_sum = flops + f, nbytes + by, act_sum + len(active)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits, b["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if rule == "gradient":
            for i in range(m):
                g = torch.cat([p.grad.reshape(-1) for p in factors[i]]).double()
                sums[i] = g if sums[i] is None else sums[i] + g
            n += 1
        for i in set(range(m)) - active:
            for p in factors[i]:
                p.grad = None  # a killed module takes no step (AdamW skips it, as on the edge)
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params.values() if p.grad is not None], cfg.max_grad_norm)
        opt.step()
        if rule != "all" and t % window == 0:
            if rule == "gradient":
                score = {i: float((sums[i] / n).abs().sum()) for i in range(m)}  # type: ignore[operator]
                active = set(sorted(score, key=lambda i: (-score[i], i))[:k])
                sums, n = [None] * m, 0
            else:
                turn = (t // window) % -(-m // k)
                active = set(order[turn * k : turn * k + k])
        if t % eval_every == 0:
            acc = evaluate(model, test_data)
            points.append((t, acc, flops, nbytes, act_sum / t))
            print(f"    {label}: step {t} acc {acc:.4f} active {act_sum / t:.2f} ({time.time() - t0:.0f} s)", flush=True)
    return points


def bench(name, model_cfg, batch_size, train_examples, test_examples, lr, eval_every, cap, rules) -> str:
    from dpeft.adapters import build_model
    from dpeft.config import AdapterConfig, DataConfig
    from dpeft.data import load_dataset, tokenize
    from dpeft.train.loop import batch_schedule

    bundle = build_model(model_cfg, AdapterConfig(), 2, 0)
    train, test = load_dataset(DataConfig(max_train_examples=train_examples, test_examples=test_examples), 0)
    data = tokenize(bundle.tokenizer, train.texts, train.labels, model_cfg.max_length)
    test_data = tokenize(bundle.tokenizer, test.texts, test.labels, model_cfg.max_length)
    schedule = batch_schedule(list(range(len(train))), cap, batch_size, 1234)
    runs = []
    for label, rule, k, window, rule_lr in rules:
        runs.append((label, run_rule(bundle, data, test_data, schedule, rule_lr or lr, rule, k, window, eval_every, label)))
    base = max(runs[0][1], key=lambda p: (p[1], -p[0]))
    lines = [
        f"**{name}**: batch {batch_size}, lr {lr:g}, AdamW, max_length {model_cfg.max_length}; {len(train)} training examples, "
        f"{len(test)} held-out; evaluated every {eval_every} steps to step {cap}. Savings are against `all` to its best evaluation "
        f"(step {base[0]}, accuracy {base[1]:.3f}).",
        "",
        "| rule | best accuracy (step) | vs all | active modules (mean/step) | edge FLOPs to best, vs all | bytes to best, vs all | first within 1 pt of all: step, FLOPs, bytes | accuracy at each evaluation |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, pts in runs:
        best = max(pts, key=lambda p: (p[1], -p[0]))
        near = next((p for p in pts if p[1] >= base[1] - 0.01 - 1e-9), None)
        near_s = "not reached" if near is None else f"{near[0]}, {100 * (near[2] / base[2] - 1):+.1f}%, {100 * (near[3] / base[3] - 1):+.1f}%"
        curve = " ".join(f"{p[1]:.3f}" for p in pts)
        lines.append(
            f"| {label} | {best[1]:.3f} ({best[0]}) | {100 * (best[1] - base[1]):+.1f} pt | {best[4]:.2f} | {100 * (best[2] / base[2] - 1):+.1f}% "
            f"| {100 * (best[3] / base[3] - 1):+.1f}% | {near_s} | {curve} |"
        )
    return "\n".join(lines)


def parse_rule(spec: str) -> tuple[str, str, int, int, float | None]:
    """'gradient,2,5,5e-3' -> (label, rule, k, window, lr)."""
    rule, k, window, *lr = spec.split(",")
    if rule not in ("all", "gradient", "cyclic"):
        raise argparse.ArgumentTypeError(f"unknown rule {rule!r}")
    label = rule if rule == "all" else f"{rule}, k={k}, window {window}"
    return (label + (f", lr {lr[0]}" if lr else ""), rule, int(k), int(window), float(lr[0]) if lr else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--minilm-cap", type=int, default=400)
    ap.add_argument("--smollm2-cap", type=int, default=150)
    ap.add_argument("--rule", type=parse_rule, action="append", help="RULE,K,WINDOW[,LR] instead of the default rules (the first is the reference)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dpeft.config import ModelConfig

    t0 = time.time()
    sections = []
    if not args.skip_minilm:
        rules = args.rule or [("all", "all", 0, 0, None), ("gradient, k=1, window 5", "gradient", 1, 5, None), ("gradient, k=2, window 5", "gradient", 2, 5, None),
                 ("cyclic, k=1, window 10", "cyclic", 1, 10, None), ("cyclic, k=1, window 25", "cyclic", 1, 25, None)]  # fmt: skip
        sections.append(bench("all-MiniLM-L6-v2, query/value (12 modules)", ModelConfig(max_length=48), 16, 4000, 400, 2e-3, 25, args.minilm_cap, rules))
        print(sections[-1], flush=True)
    if not args.skip_smollm2:
        rules = args.rule or [("all", "all", 0, 0, None), ("gradient, k=3, window 5", "gradient", 3, 5, None), ("gradient, k=6, window 5", "gradient", 6, 5, None),
                 ("cyclic, k=3, window 10", "cyclic", 3, 10, None)]  # fmt: skip
        sections.append(bench("SmolLM2-135M-Instruct, all 30 layers, q_proj/v_proj (60 modules)", ModelConfig(name="smollm2", max_length=32), 8, 2000, 100, 1e-3, 15, args.smollm2_cap, rules))
        print(sections[-1], flush=True)
    if args.no_write:
        return 0
    body = "\n\n".join(
        [
            "Written by `python benchmarks/kr_bound.py` (see its docstring). "
            + machine_note()
            + f" Total {(time.time() - t0) / 60:.1f} min; load average at the end {os.getloadavg()[0]:.1f}. "
            "One process trains the whole model; only the chosen modules (and the head) take optimizer steps; edge FLOPs and bytes are "
            "counted as split mode counts them. `gradient` ranks every module by its exact gradient at every step, which a split edge "
            "cannot see for killed modules: an upper bound for gradient-ranked choices.",
            *sections,
        ]
    )
    write_section("kr_bound", "Kill-and-Revive: what the choice of modules can reach", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
