"""RAFT records -> token ids and labels for fine-tuning a chat model.

A record becomes a chat: the RAG prompt of raft_eval_config.yaml filled with the record's instruction (documents
+ question), then the assistant's chain-of-thought answer. Only the answer and its end-of-turn token are learnt:
the labels of everything before are -100. Where the answer starts is read off the tokenizer's own chat template
(the conversation up to the generation prompt must be a token prefix of the whole conversation), never from
hard-coded token ids; labels are built from lengths, never by masking pad ids (SmolLM2's pad token is its
end-of-turn token, which must be learnt).
"""
import random
from dataclasses import dataclass, field

import format as formats
from config import fill_prompt
from errors import DataError

IGNORE_INDEX = -100          # the label PyTorch's cross-entropy skips


def load_records(paths: list[str]) -> list[dict]:
    """RAFT records from one or more JSONL files (the recipe's best model was trained on two sets combined)."""
    try:
        return [record for path in paths for record in formats.read(path, "jsonl")]
    except ValueError as e:
        raise DataError(f"data file {e} (--data_path)") from None


def split_by_question(records: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation): about `share` of the records held out, whole questions at a time, so that a question's
    copies (with its oracle, without it, as a refusal) never fall on both sides. Seeded, the same on every rank."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(" ".join(str(record.get("question") or record["instruction"]).lower().split()),
                          []).append(record)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    wanted, held, held_records = int(len(records) * share), [], 0
    for key in keys:
        if held_records >= wanted:
            break
        held.append(key)
        held_records += len(groups[key])
    held_set = set(held)
    train = [r for key in keys if key not in held_set for r in groups[key]]
    return train, [r for key in held for r in groups[key]]


def to_messages(record: dict, rag_prompt: list[dict]) -> list[dict]:
    return fill_prompt(rag_prompt, instruction=record["instruction"]) + [
        {"role": "assistant", "content": record["cot_answer"]}]


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation whose last message is the assistant's answer.

    The template renders the conversation without the answer (with the generation prompt) and with it; the
    first must be a text prefix of the second. Tokens that start inside that prefix are masked. Offsets rather
    than a token-level prefix: BPE may merge across the boundary (SmolLM2 turns a trailing "\n\n" into one token
    at the end of a prompt but two before the answer)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer of {tokenizer.name_or_path} has no chat template: use an instruct/chat model "
                        "or give the tokenizer a chat_template")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DataError(f"the chat template of {tokenizer.name_or_path} renders the prompt differently inside the "
                        "whole conversation, so the answer cannot be located: fix the template")
    # The template writes its own special tokens (bos): tokenize its text as it is.
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    starts = [start for start, _ in encoded["offset_mapping"]]
    in_prompt = next((i for i, start in enumerate(starts) if start >= len(prompt)), len(starts))
    completion = ids[in_prompt:]
    # Learn the answer and its end-of-turn token; what a template adds after that token (ChatML's newline)
    # is formatting between turns, not part of the answer.
    eos = tokenizer.eos_token_id
    end = len(completion) - completion[::-1].index(eos) if eos in completion else len(completion)
    labels = [IGNORE_INDEX] * in_prompt + completion[:end] + [IGNORE_INDEX] * (len(completion) - end)
    return ids, labels


@dataclass
class Encoded:
    examples: list[tuple[list[int], list[int]]] = field(default_factory=list)   # (input_ids, labels)
    truncated: int = 0            # examples cut to the context length (their answer partly kept)
    dropped: int = 0              # examples whose answer starts beyond the context length


def encode(records: list[dict], tokenizer, rag_prompt: list[dict], context_length: int) -> Encoded:
    out = Encoded()
    for record in records:
        ids, labels = tokenize_chat(tokenizer, to_messages(record, rag_prompt))
        if len(ids) > context_length:
            ids, labels = ids[:context_length], labels[:context_length]
            if all(label == IGNORE_INDEX for label in labels):
                out.dropped += 1
                continue
            out.truncated += 1
        out.examples.append((ids, labels))
    return out


def pack(examples: list[tuple[list[int], list[int]]], context_length: int) -> list[dict]:
    """Concatenate examples into rows of at most context_length tokens, in order, without splitting one.
    position_ids restart at 0 for every example, and transformers builds each example its own attention from them:
    SDPA with a block-diagonal mask for any batch, flash attention only for a batch of one row (the trainer then
    joins a micro-batch's rows, join_rows). No loss crosses a boundary, since every example starts with its masked
    prompt."""
    rows, current = [], {"input_ids": [], "labels": [], "position_ids": []}
    for ids, labels in examples:
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > context_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ids
        current["labels"] += labels
        current["position_ids"] += list(range(len(ids)))
    if current["input_ids"]:
        rows.append(current)
    return rows


def join_rows(rows: list[dict]) -> dict:
    """Packed rows laid end to end as one row; their position_ids keep every example apart."""
    return {key: [value for row in rows for value in row[key]] for key in ("input_ids", "labels", "position_ids")}


def unpacked(examples: list[tuple[list[int], list[int]]]) -> list[dict]:
    """One example per row, for the padding strategy."""
    return [{"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids)))} for ids, labels in examples]


def collate(rows: list[dict], pad_token_id: int) -> dict:
    """Right-pad a batch to its longest row; the attention mask and the padded labels come from the lengths."""
    import torch
    longest = max(len(r["input_ids"]) for r in rows)

    def padded(key, value):
        return torch.tensor([r[key] + [value] * (longest - len(r[key])) for r in rows])
    return {"input_ids": padded("input_ids", pad_token_id), "labels": padded("labels", IGNORE_INDEX),
            "position_ids": padded("position_ids", 0),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (longest - len(r["input_ids"]))
                                            for r in rows])}
