"""Checks of the ``data:`` section, and how its ``auto`` values resolve.

A setting the run would ignore is an error naming the key (a column given for a format that does
not read it, a Dirichlet concentration for data that gets an IID split, ...): a user who set it
meant something, and silently dropping it trains on something else.
"""

from __future__ import annotations

from dpeft.config.schema import DataConfig, RunConfig
from dpeft.errors import ConfigError

BUILTIN_DATASETS = ("rotten_tomatoes", "reuters_r8")
FORMATS = ("auto", "classification", "text", "instruction", "chat")
PARTITIONS = ("auto", "iid", "dirichlet", "column")


def resolve_format(cfg: RunConfig) -> str:
    """``data.format`` with auto resolved: classification for seq_cls, text for causal_lm."""
    if cfg.data.format != "auto":
        return cfg.data.format
    return "classification" if cfg.model.task == "seq_cls" else "text"


def has_class_labels(cfg: RunConfig) -> bool:
    """Whether the examples carry class labels a Dirichlet split can skew over."""
    fmt = resolve_format(cfg)
    if fmt == "classification" or cfg.data.dataset in BUILTIN_DATASETS:
        return True  # (plain text of a built-in corpus keeps its labels too)
    return fmt in ("instruction", "chat") and cfg.data.label_column is not None


def resolve_partition(cfg: RunConfig) -> str:
    """``data.partition`` with auto resolved: column when data.partition_column is set, dirichlet
    when the examples have class labels (plain text never), else iid."""
    if cfg.data.partition != "auto":
        return cfg.data.partition
    if cfg.data.partition_column is not None:
        return "column"
    return "dirichlet" if resolve_format(cfg) != "text" and has_class_labels(cfg) else "iid"


def _changed(d: DataConfig, key: str) -> bool:
    if key == "label_column" and d.label_column == "label":
        return False  # the earlier default, written into every resolved config (config.yaml) before it became null
    return bool(getattr(d, key) != getattr(DataConfig(), key))


def _refuse_set(d: DataConfig, keys: tuple[str, ...], why: str) -> None:
    for key in keys:
        if _changed(d, key):
            raise ConfigError(f"data.{key}", f"{why}; remove it")


def plugin_datasets() -> list[str]:
    """Names of the registered plug-in dataset loaders (:mod:`dpeft.data.loaders`)."""
    from dpeft.plugins import registered_datasets

    return sorted(registered_datasets())


def check_data(cfg: RunConfig) -> None:
    """The data section on its own and against model.task (errors name the key to change)."""
    d = cfg.data
    if d.dirichlet_alpha <= 0:
        raise ConfigError("data.dirichlet_alpha", f"must be > 0, got {d.dirichlet_alpha}")
    if d.test_examples <= 0:
        raise ConfigError("data.test_examples", f"must be > 0, got {d.test_examples}")
    for key, allowed in (
        ("dataset", (*BUILTIN_DATASETS, "file", "hf", *plugin_datasets())),
        ("format", FORMATS),
        ("partition", PARTITIONS),
    ):
        if getattr(d, key) not in allowed:
            raise ConfigError(f"data.{key}", f"must be one of {', '.join(allowed)}; got {getattr(d, key)!r}")
    if d.dataset in ("file", "hf") and not d.path:
        what = (
            "a .csv, .jsonl, .parquet or .arrow file"
            if d.dataset == "file"
            else "a save_to_disk directory, or Parquet/Arrow files"
        )
        raise ConfigError("data.path", f"dataset={d.dataset} needs data.path ({what})")
    fmt = resolve_format(cfg)
    if fmt == "classification" and cfg.model.task != "seq_cls":
        raise ConfigError(
            "data.format", "classification needs model.task=seq_cls; a causal LM trains on text, instruction or chat data"
        )
    if fmt != "classification" and cfg.model.task == "seq_cls":
        raise ConfigError(
            "data.format", f"{fmt} data trains a causal LM: set model.task=causal_lm, or data.format=classification"
        )
    builtin = d.dataset in BUILTIN_DATASETS
    if builtin:
        _refuse_set(d, ("path", "test_path"), f"is read only with data.dataset=file (data.dataset is {d.dataset})")
        _refuse_set(
            d,
            ("text_column", "label_column", "prompt_column", "response_column", "messages_column", "partition_column"),
            f"the built-in dataset {d.dataset} has no columns to choose; set data.dataset=file to read your own file",
        )
    if fmt in ("classification", "text"):
        _refuse_set(
            d,
            ("prompt_column", "response_column", "messages_column", "system_prompt", "instruction"),
            f"is read only with data.format=instruction or chat (the format is {fmt})",
        )
    if fmt == "text" and _changed(d, "label_column"):
        raise ConfigError(
            "data.label_column",
            "data.format=text trains on the whole text and reads no label; for prompt/response pairs use "
            "data.format=instruction with data.prompt_column and data.response_column, to split clients by a column "
            "use data.partition_column",
        )
    if fmt in ("instruction", "chat") and not builtin:
        _refuse_set(d, ("text_column",), f"{fmt} files are read through data.prompt_column and data.response_column")
    if fmt == "instruction":
        _refuse_set(d, ("messages_column",), "message lists are read only with data.format=chat")
    if d.instruction is not None and "{text}" not in d.instruction:
        raise ConfigError("data.instruction", "must contain {text} where the example's text goes")
    _check_partition(cfg)


def _check_partition(cfg: RunConfig) -> None:
    d = cfg.data
    method = resolve_partition(cfg)
    if method == "column" and d.partition_column is None:
        raise ConfigError(
            "data.partition_column", "data.partition=column needs the column to split by (e.g. data.partition_column=user_id)"
        )
    if method != "column" and d.partition_column is not None:
        raise ConfigError("data.partition_column", f"is used only with data.partition=column (or auto), not {d.partition}")
    if method == "column" and d.dataset in BUILTIN_DATASETS:
        raise ConfigError("data.partition", f"column needs a data file (data.dataset=file); {d.dataset} has no columns")
    if method == "dirichlet" and not has_class_labels(cfg):
        raise ConfigError(
            "data.partition",
            f"dirichlet needs class labels and {resolve_format(cfg)} data from a file has none"
            + (" (give data.label_column)" if resolve_format(cfg) in ("instruction", "chat") else "")
            + "; use iid, or column with data.partition_column",
        )
    if method != "dirichlet" and d.label_column is not None and resolve_format(cfg) in ("instruction", "chat"):
        raise ConfigError("data.label_column", f"gives class labels to a Dirichlet split only, and the split is {method}")
    if d.partition == "auto" and method != "dirichlet":
        # set for a split this data does not get: a user expecting label skew would be misled
        _refuse_set(
            d,
            ("dirichlet_alpha", "min_examples_per_client"),
            f"applies to a Dirichlet split, but data.partition=auto splits these examples {method} (they have no class labels)"
            if method == "iid"
            else "applies to a Dirichlet split, but data.partition=auto splits by data.partition_column",
        )
