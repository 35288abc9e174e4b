"""Instruction and chat data: prompts with reference responses, for causal LMs trained on the response only.

Examples come from user files (prompt/response columns, or a list of role/content messages) or
from the embedded classification corpora turned into questions ("Is this movie review fresh or
rotten?") whose answer is the label name. In the resulting :class:`TextDataset`, ``texts`` hold
the rendered prompts and ``responses`` the answers:

- ``instruction``: ``[system prompt + blank line] + prompt + "\\n\\nResponse:\\n"``;
- ``chat``: the tokenizer's own chat template over the messages before the final assistant turn,
  with ``add_generation_prompt=True``; the final assistant turn is the response. Earlier
  assistant turns stay in the prompt, and ``prompt_targets`` marks where, so every assistant
  turn of a multi-turn conversation is trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpeft.config import DataConfig
from dpeft.data.datasets import TextDataset, label_names_of
from dpeft.data.files import column, label_value, read_rows, text_value
from dpeft.errors import ConfigError, DataError

#: the prompt of the embedded corpora in instruction form; {text} is the example's text
DEFAULT_INSTRUCTIONS = {
    "rotten_tomatoes": "Is this movie review fresh or rotten? Answer with one word.\n\nReview: {text}",
    # long articles: the question goes last, where truncation (from the left) keeps it
    "reuters_r8": "Article: {text}\n\nWhich topic is this news article about? Answer with one of: {labels}.",
}
ROLES = ("system", "user", "assistant")
RESPONSE_CUE = "\n\nResponse:\n"


def render_instruction(prompt: str, system: str | None) -> str:
    """The plain-text rendering of one instruction prompt (no chat template)."""
    head = f"{system}\n\n" if system else ""
    return f"{head}{prompt}{RESPONSE_CUE}"


def _fill(template: str, text: str, labels: list[str]) -> str:
    return template.replace("{labels}", ", ".join(labels)).replace("{text}", text)


def check_chat_template(tokenizer: Any) -> None:
    """ConfigError(data.format) unless the tokenizer has a chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "data.format",
            "chat needs a tokenizer with a chat template and this model's has none; use data.format=instruction",
        )


def render_chat(tokenizer: Any, messages: list[dict[str, str]], where: str = "") -> tuple[str, str, list[tuple[int, int]]]:
    """(prompt, response, spans) of a conversation whose last message is the assistant's answer.

    ``spans``: character ranges of the prompt holding the earlier assistant turns (their content
    and the end-of-turn token right after it), trained like the response. A turn the template
    does not render verbatim at the place incremental rendering predicts is left as context.
    """
    try:
        prompt = str(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True))
        spans = []
        for k, msg in enumerate(messages[:-1]):
            if msg["role"] != "assistant" or not msg["content"]:
                continue
            head = str(tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True))
            end = len(head) + len(msg["content"])
            if not prompt.startswith(head) or prompt[len(head) : end] != msg["content"]:
                continue
            eot = getattr(tokenizer, "eos_token", None)
            if eot and prompt.startswith(eot, end):
                end += len(eot)
            spans.append((len(head), end))
    except Exception as exc:  # jinja templates raise their own errors (e.g. roles must alternate)
        raise DataError(f"{where}: the chat template refused these messages ({exc})") from None
    return prompt, messages[-1]["content"], spans


def parse_messages(value: Any, where: str, name: str) -> list[dict[str, str]]:
    """Validated role/content messages ending with a non-empty assistant turn (a DataError naming ``where``)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: column {name!r} must be a non-empty list of {{role, content}} messages, got {value!r:.80}")
    out = []
    for k, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise DataError(f"{where}: message {k} must be an object with text fields 'role' and 'content', got {msg!r:.80}")
        if msg["role"] not in ROLES:
            raise DataError(f"{where}: message {k} has unknown role {msg['role']!r} (use {', '.join(ROLES)})")
        out.append({"role": msg["role"], "content": msg["content"]})
    if out[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer, got role {out[-1]['role']!r}")
    if not out[-1]["content"].strip():
        raise DataError(f"{where}: the final assistant message is empty")
    if len(out) < 2:
        raise DataError(f"{where}: a conversation needs at least one message before the assistant's answer")
    return out


def _with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


Spans = list[tuple[int, int]]


def _render(cfg: DataConfig, fmt: str, tokenizer: Any, prompt: str, response: str, where: str) -> tuple[str, str, Spans]:
    if fmt == "instruction":
        return render_instruction(prompt, cfg.system_prompt), response, []
    messages = _with_system([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], cfg.system_prompt)
    return render_chat(tokenizer, messages, where)


def builtin_as_instructions(ds: TextDataset, cfg: DataConfig, fmt: str, tokenizer: Any) -> TextDataset:
    """An embedded corpus as questions whose answer is the label name (labels kept for partitioning)."""
    if fmt == "chat":
        check_chat_template(tokenizer)
    template = cfg.instruction or DEFAULT_INSTRUCTIONS[cfg.dataset]
    prompts, responses = [], []
    for text, label in zip(ds.texts, ds.labels, strict=True):
        prompt, response, _ = _render(
            cfg, fmt, tokenizer, _fill(template, text, ds.label_names), ds.label_names[label], cfg.dataset
        )
        prompts.append(prompt)
        responses.append(response)
    return TextDataset(prompts, list(ds.labels), ds.label_names, responses)


Row = tuple[str, str, str, str | None, Spans]


def _file_rows(cfg: DataConfig, path: str, fmt: str, tokenizer: Any) -> list[Row]:
    """(prompt, response, label, group, earlier assistant spans) of every row of one instruction/chat file."""
    out = []
    template = cfg.instruction or "{text}"
    for where, row in read_rows(path):
        at = f"{path}: {where}"
        if fmt == "chat" and cfg.messages_column in row:
            messages = parse_messages(column(path, where, row, cfg.messages_column), at, cfg.messages_column)
            if cfg.instruction:  # wraps the user turn the final answer replies to
                last = max((k for k, m in enumerate(messages) if m["role"] == "user"), default=None)
                if last is not None:
                    messages[last] = dict(messages[last], content=_fill(template, messages[last]["content"], []))
            prompt, response, spans = render_chat(tokenizer, _with_system(messages, cfg.system_prompt), at)
        else:
            if fmt == "chat" and cfg.prompt_column not in row:
                raise DataError(
                    f"{at} has neither a {cfg.messages_column!r} list nor a {cfg.prompt_column!r} column (columns: {', '.join(map(str, row))})"
                )
            text = text_value(path, where, row, cfg.prompt_column, allow_empty=False)
            answer = text_value(path, where, row, cfg.response_column, allow_empty=False)
            prompt, response, spans = _render(cfg, fmt, tokenizer, _fill(template, text, []), answer, at)
        label = label_value(path, where, row, cfg.label_column) if cfg.label_column else ""
        group = label_value(path, where, row, cfg.partition_column) if cfg.partition_column else None
        out.append((prompt, response, label, group, spans))
    return out


def load_instruction_files(cfg: DataConfig, fmt: str, tokenizer: Any) -> tuple[TextDataset, TextDataset | None]:
    """(train, optional test) of instruction/chat files; class labels from ``data.label_column`` when set."""
    if fmt == "chat":
        check_chat_template(tokenizer)
    assert cfg.path is not None
    train = _file_rows(cfg, cfg.path, fmt, tokenizer)
    test = _file_rows(cfg, cfg.test_path, fmt, tokenizer) if cfg.test_path else []
    names = label_names_of({r[2] for r in train + test})
    if cfg.label_column and len(names) < 2:
        raise DataError(f"{cfg.path}: column {cfg.label_column!r} has fewer than 2 distinct labels")
    index = {n: i for i, n in enumerate(names)}

    def build(rows: list[Row], groups: bool) -> TextDataset:
        return TextDataset(
            [r[0] for r in rows],
            [index[r[2]] for r in rows],
            names,
            [r[1] for r in rows],
            [str(r[3]) for r in rows] if groups and cfg.partition_column else None,
            _spans(rows),
        )

    return build(train, True), (build(test, False) if test else None)


def instruction_file_as_client(
    cfg: DataConfig, path: str | Path, fmt: str, tokenizer: Any, label_names: list[str]
) -> TextDataset:
    """One client's own instruction/chat file (``dpeft worker --data``); labels must be among the run's."""
    if fmt == "chat":
        check_chat_template(tokenizer)
    rows = _file_rows(cfg, str(path), fmt, tokenizer)
    index = {n: i for i, n in enumerate(label_names)}
    bad = sorted({r[2] for r in rows if r[2] not in index})
    if bad:
        raise DataError(f"{path}: labels {bad[:5]} are not among the run's labels {label_names}")
    return TextDataset([r[0] for r in rows], [index[r[2]] for r in rows], label_names, [r[1] for r in rows], None, _spans(rows))


def _spans(rows: list[Row]) -> list[Spans] | None:
    return [r[4] for r in rows] if any(r[4] for r in rows) else None
