"""The global model every round driver keeps: base + adapter for the initial state, global evaluation and PEFT export.

Evaluation runs on ``eval.device``. The model is built on the CPU and moved there only at the
first evaluation, never in the constructor: ``dpeft simulate`` forks its workers from the
coordinator after building this model, and a process that has initialised CUDA before a fork
leaves its children unable to use CUDA. (Resolving ``auto`` asks CUDA whether a GPU is there,
which initialises it too, so the choice is made at the first evaluation as well; an explicit
``cuda`` on a machine without one is refused at once through a query that does not.)
Adapter states and exports are device-independent: extracted states are CPU tensors.

For causal LMs the row also gets ``eval_perplexity`` (exp of the per-token eval loss) and, when
the held-out data has reference answers (instruction or chat data) and ``eval.generate`` allows
it, the generation score of the first ``eval.generate_examples`` prompts (``gen_accuracy``,
``gen_examples``) with ``eval.samples`` examples for ``generations.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dpeft.adapters import build_model, export_peft_dir, extract_state, load_state
from dpeft.config import RunConfig
from dpeft.data import RunData, TextDataset, load_run_data, tokenize_dataset
from dpeft.data.tokenize import TokenizedData
from dpeft.errors import ConfigError
from dpeft.rounds.generations import GENERATIONS_KEY
from dpeft.state import AdapterState
from dpeft.train import evaluate
from dpeft.train.device import check_device_spec, resolve_device
from dpeft.train.generate import generate_answers, perplexity, score_answers


def check_eval_device(spec: str) -> None:
    """ConfigError(eval.device) for a bad spelling, or a CUDA or MPS device on a machine without one,
    without initialising CUDA (the device count comes from NVML where it can)."""
    check_device_spec("eval.device", spec)
    if spec == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("eval.device", "mps was asked for but is not available on this machine")
    if spec.startswith("cuda") and torch.cuda.device_count() == 0:
        raise ConfigError(
            "eval.device", f"{spec} was asked for but no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, driver); use cpu or auto"
        )


class GlobalModel:
    """Owns one model instance used for evaluation and export (never for training).

    ``datasets`` gives (train, test) directly instead of loading ``cfg.data`` (a test set may
    carry ``responses``, the reference answers of its prompts)."""

    def __init__(self, cfg: RunConfig, datasets: tuple[TextDataset, TextDataset] | None = None) -> None:
        self.cfg = cfg
        check_eval_device(cfg.eval.device)
        #: the run's data as loaded and split among clients (None when ``datasets`` was given):
        #: what workers forked from this process train on, loaded once
        self.run_data: RunData | None = None
        if datasets is not None:
            train, test = datasets
            num_labels = len(train.label_names) if cfg.model.task == "seq_cls" else None
        else:
            # loads and partitions: fails fast (exit 2, naming the key or row) when the data cannot be
            # read or split as configured, instead of letting every worker discover it after loading the model
            data = self.run_data = load_run_data(cfg)
            train, test, num_labels = data.train, data.test, data.num_labels
        self.label_names = train.label_names
        self.num_train_examples = len(train)
        self.test_data = test  # held-out examples as text (prompts and reference responses for generation)
        self.prompts, self.references = self._generation_set(test)
        self.bundle = build_model(cfg.model, cfg.adapter, num_labels, cfg.seed)
        self.test = tokenize_dataset(self.bundle.tokenizer, test, cfg)
        self._device: torch.device | None = None  # resolved at the first evaluation (see the module docstring)
        self._test_on_device: TokenizedData | None = None

    def _generation_set(self, test: TextDataset) -> tuple[list[str], list[str]]:
        """The prompts and references to generate for (empty: no generation scoring)."""
        want = self.cfg.eval.generate
        responses: list[str] | None = getattr(test, "responses", None)
        if want is False:
            return [], []
        forced = want is True  # else auto
        if self.cfg.model.task != "causal_lm":
            if forced:
                raise ConfigError("eval.generate", "generation scoring needs a causal LM (model.task=causal_lm)")
            return [], []
        if not responses:
            if forced:
                raise ConfigError(
                    "eval.generate",
                    "true needs held-out data with reference answers (instruction or chat data); this data has none",
                )
            return [], []
        n = min(self.cfg.eval.generate_examples, len(test))
        return list(test.texts[:n]), [str(r) for r in responses[:n]]

    @property
    def generates(self) -> bool:
        """Whether evaluations score generations."""
        return bool(self.prompts)

    @property
    def device(self) -> torch.device:
        """The evaluation device; the first call resolves ``eval.device`` and moves the model there."""
        if self._device is None:
            device = resolve_device(self.cfg.eval.device, key="eval.device")
            if device.type != "cpu":
                self.bundle.model.to(device)
                t = self.test
                self._test_on_device = TokenizedData(
                    t.input_ids.to(device), t.attention_mask.to(device), t.labels.to(device) if t.labels is not None else None
                )
            self._device = device
        return self._device

    def initial_state(self) -> AdapterState:
        """The seeded initial adapter (identical on every host for the same config)."""
        return extract_state(
            self.bundle.model, {"round": 0, "method": self.cfg.adapter.method, "base_model": self.bundle.model_id}
        )

    def evaluate(self, state: AdapterState) -> dict[str, Any]:
        """Global held-out loss and accuracy of ``state``; for causal LMs also perplexity and, when on,
        the generation score (its sample generations under the recorder's ``generations`` key)."""
        device = self.device
        load_state(self.bundle.model, state)
        test = self._test_on_device if device.type != "cpu" and self._test_on_device is not None else self.test
        out: dict[str, Any] = evaluate(self.bundle.model, test, self.cfg.model.task, self.cfg.train.eval_batch_size)
        if self.cfg.model.task == "causal_lm":
            out["eval_perplexity"] = perplexity(out["eval_loss"])
        if self.generates:
            out.update(self.score_generations())
        return out

    def score_generations(self) -> dict[str, Any]:
        """``gen_accuracy`` and ``gen_examples`` of the loaded adapter, with ``eval.samples`` examples."""
        e = self.cfg.eval
        answers = generate_answers(
            self.bundle.model,
            self.bundle.tokenizer,
            self.prompts,
            e.max_new_tokens,
            self.cfg.train.eval_batch_size,
            self.cfg.model.max_length,
        )
        score = score_answers(self.prompts, self.references, answers, e.match, e.samples)
        out: dict[str, Any] = dict(score.metrics)
        if score.samples:
            out[GENERATIONS_KEY] = score.samples
        return out

    def export(self, state: AdapterState, directory: str | Path) -> Path:
        """Write ``state`` as a standard Hugging Face PEFT directory."""
        labels = self.label_names if self.cfg.model.task == "seq_cls" else None
        return export_peft_dir(self.bundle.model, state, directory, label_names=labels)
