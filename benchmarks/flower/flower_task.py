"""The dpeft default task run with Flower's simulation engine (runs in benchmarks/.venv-flower).

Same model (MiniLM + LoRA r=8 on query/value + classifier head, built by the same helper with
the same seed, so the same initial adapter), same data (Rotten Tomatoes, the same Dirichlet
split and seed, the same tokenization), same sampling (the clients of round r are
``np.random.default_rng([seed, r])``'s choice, as in dpeft), same local training (S AdamW steps
on the same per-(round, client) batches through the plain PyTorch ``local_train``), FedAvg
weighted by examples, and the same global evaluation every round (600 held-out examples) on the
server. Flower's own parts: ``ServerApp`` + ``ClientApp`` under ``flwr.simulation.run_simulation``
(the Ray backend), one CPU per virtual client, and Flower's parameter serialization.

Each Flower actor process caches the model, tokenized data and partition across rounds (what
a careful Flower user does; Flower's examples reload per call). Writes JSON lines, one per
round, to ``--out``.

    PYTHONPATH=.:benchmarks/flower benchmarks/.venv-flower/bin/python benchmarks/flower/flower_task.py --out m.jsonl [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import OrderedDict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_CACHE: dict = {}
ARGS: list[str] = []


def _cfg():
    from dpeft.validate import load_config

    return load_config(None, ARGS)


def _setup(for_server: bool = False):
    """Model, tokenized data and partition of this process (built once per process)."""
    key = "server" if for_server else "client"
    if key in _CACHE:
        return _CACHE[key]
    import torch

    from dpeft.adapters import adapter_parameters, build_model
    from dpeft.data import load_dataset, partition, tokenize

    cfg = _cfg()
    torch.set_num_threads(cfg.simulate.coordinator_threads if for_server else cfg.simulate.threads_per_process)
    train, test = load_dataset(cfg.data, cfg.seed)
    bundle = build_model(cfg.model, cfg.adapter, len(train.label_names), cfg.seed)
    names = list(adapter_parameters(bundle.model))
    if for_server:
        data = tokenize(bundle.tokenizer, test.texts, test.labels, cfg.model.max_length)
        parts = None
    else:
        data = tokenize(bundle.tokenizer, train.texts, train.labels, cfg.model.max_length)
        parts = partition(
            train.labels, cfg.clients, cfg.data.partition, cfg.seed, cfg.data.dirichlet_alpha, cfg.data.min_examples_per_client
        )
    _CACHE[key] = (cfg, bundle.model, names, data, parts, len(train.label_names))
    return _CACHE[key]


def _to_state(names, arrays):
    import torch

    from dpeft.state import AdapterState

    return AdapterState(OrderedDict((n, torch.from_numpy(a.copy())) for n, a in zip(names, arrays, strict=True)))


def _arrays(model, names):
    from dpeft.adapters import extract_state

    st = extract_state(model)
    return [st[n].numpy() for n in names]


def client_fn(context):
    from flwr.client import NumPyClient

    class LoraClient(NumPyClient):
        def fit(self, parameters, config):
            from dpeft.adapters import adapter_parameters, load_state
            from dpeft.train.loop import local_train, task_seed

            cfg, model, names, data, parts, num_labels = _setup()
            load_state(model, _to_state(names, parameters))
            cid = int(config["client_id"])
            rnd = int(config["round"])
            params = list(adapter_parameters(model).values())
            res = local_train(
                model, params, data, parts[cid], cfg.train, cfg.model.task, task_seed(cfg.seed, rnd, cid), num_labels=num_labels
            )
            return _arrays(model, names), len(parts[cid]), {"train_loss": res.train_loss, "client_id": cid}

    return LoraClient().to_client()


def server_fn(context):
    import numpy as np
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.server import ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg

    from dpeft.train.loop import evaluate

    cfg, model, names, test, _, _ = _setup(for_server=True)
    out = open(OUT, "a")  # noqa: SIM115 - closed at process exit
    t0 = time.time()

    def evaluate_fn(server_round, arrays, config):
        from dpeft.adapters import load_state

        load_state(model, _to_state(names, arrays))
        m = evaluate(model, test, cfg.model.task, cfg.train.eval_batch_size)
        out.write(
            json.dumps(
                {
                    "round": server_round,
                    "eval_accuracy": m["eval_accuracy"],
                    "eval_loss": m["eval_loss"],
                    "elapsed_s": time.time() - t0,
                }
            )
            + "\n"
        )
        out.flush()
        return m["eval_loss"], {"accuracy": m["eval_accuracy"]}

    class SameSampling(FedAvg):
        """dpeft's seeded per-round sample; the i-th sampled client id is trained by the i-th virtual node."""

        def configure_fit(self, server_round, parameters, client_manager):
            client_manager.wait_for(cfg.clients)
            proxies = [client_manager.all()[k] for k in sorted(client_manager.all())]
            rng = np.random.default_rng([cfg.seed, server_round])
            sampled = sorted(int(c) for c in rng.choice(cfg.clients, size=cfg.clients_per_round, replace=False))
            return [(proxies[i], FitIns(parameters, {"client_id": c, "round": server_round})) for i, c in enumerate(sampled)]

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

    strategy = SameSampling(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_available_clients=cfg.clients,
        evaluate_fn=evaluate_fn,
        initial_parameters=ndarrays_to_parameters(_arrays(model, names)),
    )
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=cfg.rounds))


OUT = ""


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    OUT = os.path.abspath(args.out)
    ARGS[:] = args.overrides
    os.environ["DPEFT_FLOWER_OUT"] = OUT
    os.environ["DPEFT_FLOWER_ARGS"] = json.dumps(args.overrides)
    # by reference (an importable module, PYTHONPATH carries it to the Ray actors), so each actor
    # process keeps one _CACHE across rounds instead of a pickled copy per call
    import flower_task as ft
    from flwr.client import ClientApp
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    cfg = _cfg()
    run_simulation(
        server_app=ServerApp(server_fn=ft.server_fn),
        client_app=ClientApp(client_fn=ft.client_fn),
        num_supernodes=cfg.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": cfg.simulate.processes}},
    )


# Ray actors import this module afresh: take the run's settings from the environment
if os.environ.get("DPEFT_FLOWER_ARGS"):
    ARGS[:] = json.loads(os.environ["DPEFT_FLOWER_ARGS"])
    OUT = os.environ.get("DPEFT_FLOWER_OUT", "")

if __name__ == "__main__":
    sys.exit(main())
