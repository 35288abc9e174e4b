"""The two non-dpeft sides of ``benchmarks/llm.py``, each run as its own process.

``floor``: one process, plain transformers + peft + torch.optim, the same model, LoRA, batches
and FedAvg as ``dpeft simulate``, with as many torch threads as dpeft's workers have in total.
The model, the tokenized data and the partition are built the way a dpeft worker builds them
(:class:`dpeft_workers.runtime.WorkerRuntime`), so both sides see the same rows; the training
loop itself is a plain one (forward, loss, backward, clip, AdamW step).

``reload``: the FlowerTune pattern: every client of every round builds the base model (and its
tokenizer) from disk, as FlowerTune's client ``train()`` does, then trains. Clients run in a pool
of ``simulate.processes`` processes with ``simulate.threads_per_process`` threads each (Flower's
simulation runs clients in that many actors), forked once the data is loaded.

    python benchmarks/llm_loops.py floor|reload SPEC.json OUT.json
    python benchmarks/llm_loops.py export DIR OUT.json    # the embedded SmolLM2 as a Hugging Face directory

SPEC holds ``overrides`` (the dpeft config overrides) and ``sampled`` (the clients of each
round, taken from the dpeft run so all sides train the same clients).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

_RT: Any = None  # the reload pool's runtime (data and partition; the model is rebuilt per task)


def _setup(overrides: list[str], run_dir: str) -> Any:
    from dpeft.validate import load_config
    from dpeft_workers.runtime import WorkerRuntime

    cfg = load_config(None, [*overrides, f"run_dir={run_dir}"])
    return WorkerRuntime(cfg)


def _device(cfg: Any) -> torch.device:
    from dpeft.train.device import resolve_device

    return resolve_device(getattr(cfg.train, "device", "cpu"))


def _place(model: torch.nn.Module, device: torch.device) -> None:
    """Move the model to ``device`` unless it is there already (a quantized base is placed at load)."""
    if next(model.parameters()).device != device:
        with contextlib.suppress(ValueError, RuntimeError):  # bitsandbytes models refuse .to()
            model.to(device)


def _autocast(cfg: Any, device: torch.device) -> Any:
    precision = getattr(cfg.train, "precision", "fp32")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_client(rt: Any, model: torch.nn.Module, params: list[torch.nn.Parameter], rnd: int, client: int) -> tuple[int, float]:
    """One client's local steps, the batches dpeft's worker would draw; returns (tokens, seconds)."""
    from dpeft.train.loop import batch_schedule, task_seed

    cfg = rt.cfg
    device = next(p.device for p in params)
    t0 = time.perf_counter()
    model.train()
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if getattr(cfg.train, "precision", "fp32") == "fp16" and device.type == "cuda" else None
    tokens = 0
    indices = rt.client_indices(client)
    for idx in batch_schedule(indices, cfg.train.local_steps, cfg.train.batch_size, task_seed(cfg.seed, rnd, client)):
        b = {k: v.to(device) for k, v in rt.data.batch(idx).items()}
        labels = b.get("labels")
        if labels is None or labels.dim() != 2:  # plain text: next-token loss on every real token
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        with _autocast(cfg, device):
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if cfg.train.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        tokens += int(b["attention_mask"].sum())
    model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return tokens, time.perf_counter() - t0


def _fedavg(global_state: Any, deltas: list[tuple[dict[str, torch.Tensor], int]]) -> Any:
    total = sum(n for _, n in deltas)
    for k in list(global_state.tensors):
        acc = sum(d[k].double() * n for d, n in deltas)
        global_state.tensors[k] = (global_state[k].double() + acc / total).to(global_state[k].dtype)
    return global_state


def floor(spec: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """The plain single-process loop; times the rounds (training + FedAvg) apart from the start-up."""
    from dpeft.adapters import adapter_parameters, extract_state, load_state

    t0 = time.time()
    rt = _setup(spec["overrides"], run_dir)
    cfg = rt.cfg
    torch.set_num_threads(cfg.simulate.processes * cfg.simulate.threads_per_process)
    device = _device(cfg)
    model = rt.model
    _place(model, device)
    params = list(adapter_parameters(model).values())
    base: Any = model.get_base_model()
    footprint = int(base.get_memory_footprint())
    global_state = extract_state(model)
    setup_s = time.time() - t0
    tokens, rounds_s, train_s = 0, [], 0.0
    for rnd, sampled in enumerate(spec["sampled"], start=1):
        t1 = time.perf_counter()
        deltas = []
        for c in sampled:
            load_state(model, global_state)
            n_tok, s = train_client(rt, model, params, rnd, c)
            tokens += n_tok
            train_s += s
            local = extract_state(model)
            deltas.append(({k: local[k].cpu() - global_state[k].cpu() for k in global_state.tensors}, len(rt.client_indices(c))))
        global_state = _fedavg(global_state, deltas)
        load_state(model, global_state)
        rounds_s.append(time.perf_counter() - t1)
    out = {"setup_s": setup_s, "rounds_s": rounds_s, "train_s": train_s, "tokens": tokens, "footprint_bytes": footprint}
    out["wall_s"] = time.time() - t0
    if device.type == "cuda":
        out["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated(device))
    return out


def _pool_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _reload_task(args: tuple[int, int, dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], int, int, float, float]:
    """FlowerTune's client train(): build the base + LoRA from disk, load the global, train, send the delta."""
    from dpeft.adapters import adapter_parameters, build_model, extract_state, load_state
    from dpeft.state import AdapterState

    rnd, client, global_tensors = args
    rt = _RT
    cfg = rt.cfg
    t0 = time.perf_counter()
    bundle = build_model(cfg.model, cfg.adapter, rt.num_labels, cfg.seed)
    model = bundle.model
    _place(model, _device(cfg))
    build_s = time.perf_counter() - t0
    load_state(model, AdapterState(dict(global_tensors)))
    params = list(adapter_parameters(model).values())
    tokens, train_s = train_client(rt, model, params, rnd, client)
    local = extract_state(model)
    delta = {k: local[k].cpu() - v for k, v in global_tensors.items()}
    del model, bundle
    return delta, len(rt.client_indices(client)), tokens, build_s, train_s


def reload(spec: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Rounds of the reload pattern in a pool forked once this process has the data; per-round wall time."""
    from dpeft.adapters import extract_state

    global _RT
    torch.set_num_threads(1)  # OpenMP's thread pool does not survive a fork: stay single-threaded until then
    _RT = _setup(spec["overrides"], run_dir)  # data and partition, inherited by the pool
    global_state = extract_state(_RT.model)  # the seeded initial adapter, as dpeft's
    _RT.model = _RT.bundle = None
    cfg = _RT.cfg
    rounds_s, build_s, train_s, tokens = [], [], 0.0, 0
    with mp.get_context("fork").Pool(
        cfg.simulate.processes, initializer=_pool_init, initargs=(cfg.simulate.threads_per_process,)
    ) as pool:
        for rnd, sampled in enumerate(spec["sampled"], start=1):
            t1 = time.perf_counter()
            tensors = {k: v.cpu() for k, v in global_state.items()}
            results = pool.map(_reload_task, [(rnd, c, tensors) for c in sampled], chunksize=1)
            global_state = _fedavg(global_state, [(d, n) for d, n, *_ in results])
            rounds_s.append(time.perf_counter() - t1)
            build_s += [r[3] for r in results]
            train_s += sum(r[4] for r in results)
            tokens += sum(r[2] for r in results)
    return {"rounds_s": rounds_s, "build_s": build_s, "train_s": train_s, "tokens": tokens}


def export(out_dir: str) -> dict[str, Any]:
    """Save the embedded SmolLM2 (a GGUF file) once as an ordinary Hugging Face directory (safetensors)."""
    from transformers import AutoModelForCausalLM

    from dpeft.adapters.model import load_tokenizer, resolve_model_source
    from dpeft.config import ModelConfig

    path, gguf, _ = resolve_model_source(ModelConfig(name="smollm2"))
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf)
    # transformers records the GGUF origin as a quantizer; the weights are plain fp32 tensors by now
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    load_tokenizer(ModelConfig(name="smollm2")).save_pretrained(out_dir)  # type: ignore[attr-defined]
    return {"path": out_dir}


def main() -> None:
    mode, spec_path, out_path = sys.argv[1:4]
    run_dir = os.path.join(os.path.dirname(out_path), f"{mode}-run")
    if mode == "export":
        result = export(spec_path)
    else:
        spec = json.loads(Path(spec_path).read_text())
        result = floor(spec, run_dir) if mode == "floor" else reload(spec, run_dir)
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
