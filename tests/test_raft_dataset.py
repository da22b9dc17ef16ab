"""finetune/raft_dataset.py: masking from the tokenizer's own chat template, truncation, packing, padding."""
import copy
import json

import pytest

from config import EVAL_SCHEMA, load_config
from finetune.raft_dataset import (IGNORE_INDEX, DataError, collate, encode, load_records, pack, split_by_question,
                                   to_messages, tokenize_chat, unpacked)
from tests.conftest import GGUF, ROOT
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ANSWER = "The guide says ##begin_quote## Llama 3 supports 8K tokens. ##end_quote##\n<ANSWER>: 8K tokens"
RECORD = {"instruction": "<DOCUMENT>Llama 3 supports 8K tokens.</DOCUMENT>\nHow long is the context?",
          "cot_answer": ANSWER}


@pytest.fixture(scope="module")
def chatml():
    """SmolLM2's own tokenizer (ChatML template, eos = pad = <|im_end|>), read from the GGUF the teacher uses."""
    if not GGUF.exists():
        pytest.fail("models/SmolLM2-135M-Instruct.Q4_1.gguf is missing: run `make setup`")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def llama3(chatml):
    tokenizer = copy.deepcopy(chatml)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                  "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def rag_prompt():
    return load_config(str(ROOT / "raft_eval_config.yaml"), EVAL_SCHEMA)["rag_prompt"]


def learnt(tokenizer, ids, labels):
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_chatml_learns_the_answer_and_its_end_of_turn_only(chatml, rag_prompt):
    messages = to_messages(RECORD, rag_prompt)
    assert messages[-2] == {"role": "user", "content": RECORD["instruction"]} and messages[0]["role"] == "system"
    ids, labels = tokenize_chat(chatml, messages)
    assert learnt(chatml, ids, labels) == ANSWER + "<|im_end|>"
    assert labels[-1] == IGNORE_INDEX and chatml.decode(ids[-1:]) == "\n"       # the newline between turns
    assert chatml.eos_token_id == chatml.pad_token_id and chatml.eos_token_id in [l for l in labels if l >= 0]
    prompt_part = chatml.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX][:-1])
    assert prompt_part.endswith("<|im_start|>assistant\n") and RECORD["instruction"] in prompt_part


def test_llama3_style_template(llama3, rag_prompt):
    ids, labels = tokenize_chat(llama3, to_messages(RECORD, rag_prompt))
    assert learnt(llama3, ids, labels) == ANSWER + "<|eot_id|>"
    assert llama3.decode(ids[:1]) == "<|begin_of_text|>" and labels[-1] != IGNORE_INDEX


def test_templates_that_cannot_be_used_are_clear_errors(chatml, rag_prompt):
    broken = copy.deepcopy(chatml)
    broken.chat_template = ("{% if messages[-1]['role'] == 'assistant' %}TRAINING {% endif %}"
                            + chatml.chat_template)
    with pytest.raises(DataError, match="renders the prompt differently"):
        tokenize_chat(broken, to_messages(RECORD, rag_prompt))
    broken.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        tokenize_chat(broken, to_messages(RECORD, rag_prompt))


def test_truncation_is_counted_and_answerless_examples_dropped(chatml, rag_prompt):
    full = len(tokenize_chat(chatml, to_messages(RECORD, rag_prompt))[0])
    assert encode([RECORD], chatml, rag_prompt, full).truncated == 0
    cut = encode([RECORD], chatml, rag_prompt, full - 5)
    assert cut.truncated == 1 and len(cut.examples[0][0]) == full - 5
    none = encode([RECORD], chatml, rag_prompt, 10)
    assert none.dropped == 1 and none.examples == []


def test_packing_keeps_examples_whole_and_restarts_positions(chatml, rag_prompt):
    records = [dict(RECORD, cot_answer=ANSWER + " " + "more " * i) for i in range(6)]
    examples = encode(records, chatml, rag_prompt, 4096).examples
    longest = max(len(ids) for ids, _ in examples)
    rows = pack(examples, 2 * longest + 3)
    assert len(rows) == 3 and all(len(r["input_ids"]) <= 2 * longest + 3 for r in rows)
    assert sum((r["input_ids"] for r in rows), []) == sum((ids for ids, _ in examples), [])
    assert sum((r["labels"] for r in rows), []) == sum((labels for _, labels in examples), [])
    starts = [i for r in rows for i, p in enumerate(r["position_ids"]) if p == 0]
    assert len(starts) == 6
    for row in rows:           # no loss on the first token of an example: it belongs to its masked prompt
        assert all(row["labels"][i] == IGNORE_INDEX for i, p in enumerate(row["position_ids"]) if p == 0)


def test_padding_mask_comes_from_lengths_not_pad_ids(chatml, rag_prompt):
    examples = encode([RECORD, dict(RECORD, cot_answer="Short. <ANSWER>: no")], chatml, rag_prompt, 4096).examples
    batch = collate(unpacked(examples), chatml.pad_token_id)
    lengths = [len(ids) for ids, _ in examples]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert (batch["labels"][short, min(lengths):] == IGNORE_INDEX).all()
    # The real end-of-turn token (same id as the pad token) is still learnt in the shorter row.
    assert chatml.eos_token_id in batch["labels"][short, :min(lengths)].tolist()


def test_load_records_errors(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps(RECORD) + "\n\n" + json.dumps(RECORD) + "\n")
    other = tmp_path / "b.jsonl"
    other.write_text(json.dumps(RECORD) + "\n")
    assert len(load_records([str(good), str(other)])) == 3
    with pytest.raises(DataError, match="not found"):
        load_records([str(tmp_path / "none.jsonl")])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_records([str(tmp_path / "empty.jsonl")])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match="line 1: missing field\\(s\\) instruction, cot_answer"):
        load_records([str(tmp_path / "bad.jsonl")])


def test_the_validation_split_keeps_each_question_on_one_side():
    """raft.py writes up to three records per question (with the oracle, without it, a refusal); validating on a
    question the model trained on would measure memory, not generalisation."""
    records = []
    for q in range(30):
        copies = 1 + q % 3
        records += [{"id": f"seed_task_{q}_{c}", "question": f"Question {q}?", "instruction": f"docs {c}\nQuestion {q}?",
                     "cot_answer": "<ANSWER>: a"} for c in range(copies)]
    train, val = split_by_question(records, 0.2, seed=42)
    assert len(train) + len(val) == len(records) and 0.2 * len(records) <= len(val) < 0.2 * len(records) + 3
    assert not {r["question"] for r in train} & {r["question"] for r in val}
    assert split_by_question(records, 0.2, seed=42) == (train, val)          # the same on every rank
    everything, none = split_by_question(records, 0.0, seed=42)
    assert none == [] and sorted(r["id"] for r in everything) == sorted(r["id"] for r in records)
