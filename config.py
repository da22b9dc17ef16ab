"""Loading and validating the YAML configs (raft.yaml, raft_eval_config.yaml).

A config file must hold exactly the keys of its schema: a missing key, an unknown key (usually a typo),
a wrong type or a value out of range is a ConfigError whose message names the file and the key.
The shipped YAML files are the documentation of every key; the schemas here only say what is valid.
"""
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import yaml


TOOLKIT_VERSION = "0.1.0"


class ConfigError(Exception):
    """A user mistake in a config file or a flag: the message says which key and what to do."""


@dataclass(frozen=True)
class Key:
    kind: type | tuple          # accepted Python type(s) after YAML parsing
    check: Optional[Callable[[Any], Optional[str]]] = None  # returns a problem description, or None


def probability(value) -> Optional[str]:
    return None if 0.0 <= value <= 1.0 else f"must be between 0 and 1, got {value}"


def non_negative(value) -> Optional[str]:
    return None if value >= 0 else f"must be 0 or more, got {value}"


def positive(value) -> Optional[str]:
    return None if value > 0 else f"must be greater than 0, got {value}"


def positive_ints(value) -> Optional[str]:
    ok = value and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    return None if ok else f"must be a non-empty list of whole numbers greater than 0, got {value!r}"


def one_of(*choices) -> Callable[[Any], Optional[str]]:
    def check(value):
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}, got {value!r}"
    return check


def chat_messages(*placeholders: str) -> Callable[[Any], Optional[str]]:
    """A prompt: a list of {role, content} chat messages that together use every placeholder."""
    def check(value):
        if not value or not all(isinstance(m, dict) and set(m) == {"role", "content"} for m in value):
            return "must be a non-empty list of messages, each with exactly 'role' and 'content'"
        roles = [m["role"] for m in value]
        if any(role not in ("system", "user", "assistant") for role in roles):
            return f"roles must be system, user or assistant, got {roles}"
        if not all(isinstance(m["content"], str) for m in value):
            return "every message content must be a string"
        text = "".join(m["content"] for m in value)
        missing = [p for p in placeholders if "{" + p + "}" not in text]
        return f"must contain the placeholder(s) {', '.join('{' + p + '}' for p in missing)}" if missing else None
    return check


def fill_prompt(messages: list[dict], **values) -> list[dict]:
    """Put values into a prompt's {placeholders}; plain replacement, so other braces in a prompt are safe."""
    filled = []
    for m in messages:
        content = m["content"]
        for name, value in values.items():
            content = content.replace("{" + name + "}", str(value))
        filled.append({"role": m["role"], "content": content})
    return filled


def _type_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true/false",
                        list: "a list", dict: "a mapping"}.get(k, k.__name__) for k in kinds)


def validate_value(source: str, name: str, value, key: Key):
    """Return the value (ints widened to floats where a number is expected) or raise ConfigError."""
    kinds = key.kind if isinstance(key.kind, tuple) else (key.kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # bool is a subclass of int in Python: `questions_per_chunk: true` must not pass as 1.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ConfigError(f"{source}: key '{name}' must be {_type_name(key.kind)}, got {value!r}")
    problem = key.check(value) if key.check else None
    if problem:
        raise ConfigError(f"{source}: key '{name}' {problem}")
    return value


def load_config(path: str, schema: dict[str, Key]) -> dict:
    """Read a YAML file and validate it against the schema."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found: pass an existing file with -c") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values")
    for name in raw:
        if name not in schema:
            close = difflib.get_close_matches(str(name), schema, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}: unknown key '{name}'{hint}")
    missing = [name for name in schema if name not in raw]
    if missing:
        raise ConfigError(f"{path}: missing key(s) {', '.join(missing)}: copy them from the shipped file")
    return {name: validate_value(path, name, raw[name], key) for name, key in schema.items()}


def apply_overrides(config: dict, overrides: dict, schema: dict[str, Key]) -> dict:
    """Command-line flags win over the file; None means the flag was not given."""
    merged = dict(config)
    for name, value in overrides.items():
        if value is not None:
            merged[name] = validate_value("command line", name, value, schema[name])
    return merged


def load_config_with_flags(path: str, schema: dict[str, Key], flags) -> dict:
    """The config file, then every parsed command-line flag (argparse namespace) named like one of its keys."""
    overrides = {name: getattr(flags, name) for name in schema if getattr(flags, name, None) is not None}
    return apply_overrides(load_config(path, schema), overrides, schema)


# Keys both configs have: the sources and their chunking (the retriever must chunk as raft.py did), and the client.
SOURCE_KEYS: dict[str, Key] = {
    "data_dir": Key(str),
    "xml_path": Key(str),
    "verify_ssl": Key(bool),
    "chunk_size": Key(int, positive),
}
CLIENT_KEYS: dict[str, Key] = {
    "max_in_flight": Key(int, positive),
    "request_timeout": Key(float, positive),
    "max_retries": Key(int, non_negative),
    "rpm": Key(int, non_negative),
    "tpm": Key(int, non_negative),
    "rate_limit_wait": Key(float, positive),
}


# The schema of raft.yaml; raft.yaml itself documents what each key means.
RAFT_SCHEMA: dict[str, Key] = {
    **SOURCE_KEYS,
    "questions_per_chunk": Key(int, positive),
    "num_distract_docs": Key(int, non_negative),
    "oracle_probability": Key(float, probability),
    "refusal_probability": Key(float, probability),
    "refusal_answer": Key(str),
    "quote_check": Key(str, one_of("flag", "drop")),
    "seed": Key(int),
    "model": Key(str),
    "temperature": Key(float, non_negative),
    "question_max_tokens": Key(int, positive),
    "answer_max_tokens": Key(int, positive),
    **CLIENT_KEYS,
    "output": Key(str),
    "output_format": Key(str, one_of("hf", "completion", "chat")),
    "output_type": Key(str, one_of("jsonl", "parquet")),
    "output_chat_system_prompt": Key(str),
    "cache_path": Key(str),
    "window_chunks": Key(int, positive),
    "question_prompt": Key(list, chat_messages("context", "num_questions")),
    "answer_prompt": Key(list, chat_messages("context", "question")),
    "answer_retry_prompt": Key(str),
}


# The schema of raft_eval_config.yaml (evaluation and chat; rag_prompt also for fine-tuning).
EVAL_SCHEMA: dict[str, Key] = {
    "eval_file": Key(str),
    **SOURCE_KEYS,
    "rag_topk": Key(list, positive_ints),
    "retriever": Key(str, one_of("hybrid", "dense", "bm25")),
    "embedding_model": Key(str),
    "embedding_batch_size": Key(int, positive),
    "embedding_dtype": Key(str, one_of("auto", "float32", "bfloat16")),
    "hybrid_dense_weight": Key(float, probability),
    "bm25_k1": Key(float, positive),
    "bm25_b": Key(float, probability),
    "bm25_stemming": Key(bool),
    "source_titles": Key(bool),
    "query_rewrite": Key(bool),
    "approximate_above": Key(int, positive),
    "index_cache": Key(str),
    "temperature": Key(float, non_negative),
    "answer_max_tokens": Key(int, positive),
    "judge_max_tokens": Key(int, positive),
    "judge_calibration": Key(bool),
    "judge_min_rate": Key(float, probability),
    "bootstrap_resamples": Key(int, positive),
    "raft_config": Key(str),
    **CLIENT_KEYS,
    "output": Key(str),
    "model_prompt": Key(list, chat_messages("question")),
    "rag_prompt": Key(list, chat_messages("instruction")),
    "judge_prompt": Key(list, chat_messages("question", "gold_answer", "answer")),
}
