"""The global model every round driver keeps: base + adapter for the initial state, global evaluation and PEFT export."""

from __future__ import annotations

from pathlib import Path

from dpeft.adapters import build_model, export_peft_dir, extract_state, load_state
from dpeft.config import RunConfig
from dpeft.data import load_run_data, tokenize_dataset
from dpeft.state import AdapterState
from dpeft.train import evaluate


class GlobalModel:
    """Owns one model instance used for evaluation and export (never for training)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        # loads and partitions: fails fast (exit 2, naming the key or row) when the data cannot be
        # read or split as configured, instead of letting every worker discover it after loading the model
        data = load_run_data(cfg)
        self.label_names = data.label_names
        self.num_train_examples = len(data.train)
        self.test_data = data.test  # held-out examples as text (prompts and reference responses for generation)
        self.bundle = build_model(cfg.model, cfg.adapter, data.num_labels, cfg.seed)
        self.test = tokenize_dataset(self.bundle.tokenizer, data.test, cfg)

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
