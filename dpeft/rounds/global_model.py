"""The global model every round driver keeps: base + adapter for the initial state, global evaluation and PEFT export."""

from __future__ import annotations

from pathlib import Path

from dpeft.adapters import build_model, export_peft_dir, extract_state, load_state
from dpeft.config import RunConfig
from dpeft.data import load_dataset, partition, tokenize
from dpeft.state import AdapterState
from dpeft.train import evaluate


class GlobalModel:
    """Owns one model instance used for evaluation and export (never for training)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        need_labels = cfg.model.task == "seq_cls"
        train, test = load_dataset(cfg.data, cfg.seed, need_labels=need_labels)
        self.label_names = train.label_names
        self.num_train_examples = len(train)
        # fail fast (exit 2, naming the key) when the data cannot be split as configured,
        # instead of letting every worker discover it after loading the model
        partition(
            train.labels, cfg.clients, cfg.data.partition, cfg.seed, cfg.data.dirichlet_alpha, cfg.data.min_examples_per_client
        )
        self.bundle = build_model(cfg.model, cfg.adapter, len(self.label_names) if need_labels else None, cfg.seed)
        self.test = tokenize(self.bundle.tokenizer, test.texts, test.labels if need_labels else None, cfg.model.max_length)

    def initial_state(self) -> AdapterState:
        """The seeded initial adapter (identical on every host for the same config)."""
        return extract_state(self.bundle.model, {"round": 0, "method": self.cfg.adapter.method, "base_model": self.bundle.model_id})

    def evaluate(self, state: AdapterState) -> dict[str, float]:
        """Global held-out loss and accuracy of ``state``."""
        load_state(self.bundle.model, state)
        return evaluate(self.bundle.model, self.test, self.cfg.model.task, self.cfg.train.eval_batch_size)

    def export(self, state: AdapterState, directory: str | Path) -> Path:
        """Write ``state`` as a standard Hugging Face PEFT directory."""
        return export_peft_dir(self.bundle.model, state, directory)
