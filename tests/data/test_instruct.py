"""Instruction and chat data: rendering, response-only token labels, truncation that keeps the response.

Uses SmolLM2's real tokenizer (only the tokenizer is loaded) and MiniLM's (no chat template).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dpeft.adapters.model import load_tokenizer
from dpeft.config import ModelConfig
from dpeft.data import load_run_data, tokenize_dataset
from dpeft.data.instruct import DEFAULT_INSTRUCTIONS, check_chat_template
from dpeft.data.tokenize import IGNORE, fit_pair, tokenize_pairs
from dpeft.errors import ConfigError, DataError
from dpeft.validate import load_config

LM = ["model.name=smollm2", "model.task=causal_lm"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name="smollm2", task="causal_lm"))


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _cfg(*extra: str):
    return load_config(None, [*LM, "clients=2", "clients_per_round=2", *extra])


# ---------------------------------------------------------------------- the loss mask


def test_labels_are_exactly_the_response_and_eos(tok) -> None:
    prompts = ["Is this fresh or rotten?\n\nReview: a fine film\n\nResponse:\n", "Say hi.\n\nResponse:\n"]
    responses = ["fresh", "Hello there, friend"]
    data = tokenize_pairs(tok, prompts, responses, max_length=48)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        r_ids = tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(p_ids) + len(r_ids)  # SmolLM2 adds no BOS
        assert data.input_ids[i, :n].tolist() == p_ids + r_ids
        assert data.attention_mask[i].tolist() == [1] * n + [0] * (48 - n)
        want = [IGNORE] * len(p_ids) + r_ids + [IGNORE] * (48 - n)
        assert data.labels[i].tolist() == want
    # a batch is trimmed to its longest row and keeps the token labels aligned
    batch = data.batch([0, 1])
    width = int(data.attention_mask.sum(1).max())
    assert batch["labels"].shape == batch["input_ids"].shape == (2, width)
    assert tok.decode(batch["labels"][1][batch["labels"][1] != IGNORE]) == "Hello there, friend<|im_end|>"


def test_fit_pair_cuts_the_prompt_from_the_left_then_the_response() -> None:
    prompt, response = list(range(10)), [100, 101, 102]
    assert fit_pair([], prompt, response, 20) == (prompt, response, False)
    assert fit_pair([], prompt, response, 8) == ([5, 6, 7, 8, 9], response, False)
    assert fit_pair([7], prompt, response, 8) == ([6, 7, 8, 9], response, False)  # room for the prefix
    long = list(range(100, 120))
    p, r, cut = fit_pair([], prompt, long, 8)  # the response alone overflows: half the window stays prompt
    assert (p, r, cut) == ([6, 7, 8, 9], long[:4], True)


def test_truncation_keeps_the_response(tok, caplog) -> None:
    prompt = "Summarise this. " + " ".join(f"word{i}" for i in range(60)) + "\n\nResponse:\n"
    data = tokenize_pairs(tok, [prompt], ["rotten"], max_length=16)
    row = data.input_ids[0].tolist()
    r_ids = tok("rotten", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert int(data.attention_mask[0].sum()) == 16
    assert row[-len(r_ids) :] == r_ids  # the response and EOS survive whole, at the end
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert row[: 16 - len(r_ids)] == p_ids[-(16 - len(r_ids)) :]  # the prompt's tail is kept
    assert data.labels[0].tolist() == [IGNORE] * (16 - len(r_ids)) + r_ids
    # an earlier assistant turn marked in the prompt stays a target, aligned, after the left cut
    turn = "Earlier answer."
    at = prompt.index("word58")
    marked = prompt[:at] + turn + " " + prompt[at:]
    data = tokenize_pairs(tok, [marked], ["rotten"], max_length=32, prompt_targets=[[(at, at + len(turn))]])
    targets = data.labels[0] != IGNORE
    assert torch.equal(data.labels[0][targets], data.input_ids[0][targets])
    assert tok.decode(data.labels[0][targets]) == " " + turn + "rotten<|im_end|>"  # (the space before it is in its token)
    # a response longer than the window is cut, and a debug line says so
    with caplog.at_level(logging.DEBUG, logger="dpeft.data"):
        data = tokenize_pairs(tok, ["Write a story.\n\nResponse:\n"], [" ".join(["once upon a time"] * 20)], max_length=16)
    assert int((data.labels[0] != IGNORE).sum()) >= 8
    assert any("1 responses cut" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- rendering


def test_builtin_corpus_as_instructions() -> None:
    data = load_run_data(_cfg("data.format=instruction", "data.max_train_examples=300", "data.test_examples=20"))
    train = data.train
    assert data.format == "instruction" and data.num_labels is None
    assert train.responses is not None and set(train.responses) == {"fresh", "rotten"}
    for text, resp, lab in zip(train.texts[:20], train.responses[:20], train.labels[:20], strict=True):
        assert text.startswith("Is this movie review fresh or rotten? Answer with one word.\n\nReview: ")
        assert text.endswith("\n\nResponse:\n")
        assert train.label_names[lab] == resp  # the class is kept for partitioning
    assert len(data.partitions) == 2  # auto: Dirichlet over the sentiment classes
    reuters = load_run_data(
        _cfg(
            "data.dataset=reuters_r8",
            "data.format=instruction",
            "data.max_train_examples=50",
            "data.test_examples=10",
            "data.partition=iid",
        )
    )
    assert "acq, crude, earn, grain, interest, money-fx, ship, trade" in reuters.train.texts[0]
    assert "{labels}" in DEFAULT_INSTRUCTIONS["reuters_r8"]


def test_custom_instruction_and_system_prompt() -> None:
    data = load_run_data(
        _cfg(
            "data.format=instruction",
            'data.instruction="Review: {text}\\nVerdict?"',
            "data.system_prompt=You judge films.",
            "data.max_train_examples=40",
            "data.test_examples=10",
            "data.partition=iid",
        )
    )
    assert data.train.texts[0].startswith("You judge films.\n\nReview: ")
    assert data.train.texts[0].endswith("\nVerdict?\n\nResponse:\n")


def test_chat_file_renders_with_the_tokenizers_template(tmp_path, tok) -> None:
    conv = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    rows = [{"messages": conv}] * 5 + [{"prompt": f"Say {i}", "response": str(i)} for i in range(5)]
    path = _jsonl(tmp_path / "chat.jsonl", rows)
    cfg = _cfg("data.dataset=file", f"data.path={path}", "data.format=chat", "data.test_examples=2")
    data = load_run_data(cfg, tokenizer=tok)
    assert data.train.responses is not None
    by_response = dict(zip(data.train.responses + data.test.responses, data.train.texts + data.test.texts, strict=True))
    expected = (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert by_response["Rome."] == expected  # the earlier assistant turn is context, the final one the answer
    assert by_response["Rome."] == tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
    # prompt/response rows become one user turn (the template adds its default system turn)
    assert by_response["3"].endswith("<|im_start|>user\nSay 3<|im_end|>\n<|im_start|>assistant\n")
    # tokenized: the template's own special tokens, no extra prefix; every assistant turn is a
    # target (its content and end-of-turn token), nothing else
    tokens = tokenize_dataset(tok, data.train, cfg)
    i = data.train.responses.index("Rome.")
    targets = tokens.labels[i] != IGNORE
    assert tok.decode(tokens.labels[i][targets]) == "Paris.<|im_end|>Rome.<|im_end|>"
    assert torch.equal(tokens.labels[i][targets], tokens.input_ids[i][targets])
    assert tokens.input_ids[i, 0].item() == tok.convert_tokens_to_ids("<|im_start|>")
    single = data.train.responses.index(next(r for r in data.train.responses if r != "Rome."))
    assert tok.decode(tokens.labels[single][tokens.labels[single] != IGNORE]) == data.train.responses[single] + "<|im_end|>"


def test_chat_needs_a_template_and_a_bos_prefix_stays_first() -> None:
    bert = load_tokenizer(ModelConfig(name="minilm"))  # no chat template; [CLS] before every text
    with pytest.raises(ConfigError) as info:
        check_chat_template(bert)
    assert info.value.key == "data.format"
    bert.eos_token = "[SEP]"
    data = tokenize_pairs(bert, [" ".join(["long prompt"] * 20)], ["yes"], max_length=8)
    row = data.input_ids[0].tolist()
    assert row[0] == bert.cls_token_id  # kept through the left cut
    assert row[-2:] == [bert.convert_tokens_to_ids("yes"), bert.sep_token_id]
    assert data.labels[0].tolist() == [IGNORE] * 6 + row[-2:]


# ---------------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"prompt": "x"}, "'response'"),
        ({"prompt": "x", "response": "  "}, "is empty"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}, "unknown role 'bot'"),
        ({"messages": "hello"}, "must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "x"}]}, "last message must be the assistant"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, tok, row, needle: str) -> None:
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(6)]
    rows[3] = row
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_run_data(_cfg("data.dataset=file", f"data.path={path}", "data.format=chat"), tokenizer=tok)
    assert f"{path}: line 4" in str(info.value) and needle in str(info.value)
    assert info.value.exit_code == 2
