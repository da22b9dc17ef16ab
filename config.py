"""Loading and validating the YAML configs (raft.yaml, raft_eval_config.yaml).

A config file must hold exactly the keys of its schema: a missing key, an unknown key (usually a typo),
a wrong type or a value out of range is a ConfigError whose message names the file and the key.
The shipped YAML files are the documentation of every key; the schemas here only say what is valid.
"""
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from errors import ConfigError

TOOLKIT_VERSION = "0.1.0"


@dataclass(frozen=True)
class Key:
    kind: type | tuple          # accepted Python type(s) after YAML parsing
    check: Optional[Callable[[Any], Optional[str]]] = None  # returns a problem description, or None
    default: Any = None         # recipe schemas only (FINETUNE_SCHEMA): the value when neither file nor flag sets it
    help: str = ""              # recipe schemas only: the flag's help
    fields: Optional[dict] = None   # a section (a mapping of its own keys, each checked like a top-level one)


def probability(value) -> Optional[str]:
    return None if 0.0 <= value <= 1.0 else f"must be between 0 and 1, got {value}"


def non_negative(value) -> Optional[str]:
    return None if value >= 0 else f"must be 0 or more, got {value}"


def positive(value) -> Optional[str]:
    return None if value > 0 else f"must be greater than 0, got {value}"


def positive_ints(value) -> Optional[str]:
    ok = value and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    return None if ok else f"must be a non-empty list of whole numbers greater than 0, got {value!r}"


def strings(value) -> Optional[str]:
    ok = value and all(isinstance(v, str) and v for v in value)
    return None if ok else f"must be a non-empty list of names, got {value!r}"


def names(value) -> Optional[str]:
    ok = all(isinstance(v, str) and v and not v.isspace() for v in value)
    return None if ok else f"must be a list of names (possibly empty), got {value!r}"


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
    if key.fields is not None:
        _reject_unknown(source, value, key.fields, prefix=f"{name}.")
        missing = [field for field in key.fields if field not in value]
        if missing:
            raise ConfigError(f"{source}: section '{name}' misses {', '.join(missing)}: copy them from the shipped file")
        return {field: validate_value(source, f"{name}.{field}", value[field], sub) for field, sub in key.fields.items()}
    return value


def _read_mapping(path: str) -> dict:
    """A YAML file's top-level mapping, or a ConfigError naming the file."""
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
    return raw


def _reject_unknown(path: str, raw: dict, schema: dict[str, Key], prefix: str = ""):
    for name in raw:
        if name not in schema:
            close = difflib.get_close_matches(str(name), schema, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}: unknown key '{prefix}{name}'{hint}")


def load_config(path: str, schema: dict[str, Key]) -> dict:
    """Read a YAML file and validate it against the schema: every key present, none unknown."""
    raw = _read_mapping(path)
    _reject_unknown(path, raw, schema)
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


# The documents and their chunking: set in raft.yaml, recorded in raft.py's raft_run.json and read back from there by
# the evaluation and the chatbot (generation_settings), whose retriever must see the chunks the teacher was asked about.
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
# What the evaluation and the chatbot take from the generation run besides the sources: the label of its refusal
# examples, which is how a refusal is recognised.
GENERATION_KEYS: dict[str, Key] = {**SOURCE_KEYS, "refusal_answer": Key(str)}


# raft.yaml's quality section: the filters of quality.py.
QUALITY_KEYS: dict[str, Key] = {
    "answer_checks": Key(bool),
    "question_checks": Key(bool),
    "min_question_words": Key(int, positive),
    "max_question_words": Key(int, positive),
    "duplicates": Key(bool),
    "duplicate_method": Key(str, one_of("jaccard", "embedding")),
    "duplicate_threshold": Key(float, probability),
    "embedding_model": Key(str),
    "round_trip": Key(bool),
    "round_trip_retriever": Key(str, one_of("bm25", "dense", "hybrid")),
    "round_trip_k": Key(int, positive),
    "copy_threshold": Key(float, probability),
    "teacher_grade": Key(bool),
    "teacher_grade_threshold": Key(int, positive),
    "teacher_grade_max_tokens": Key(int, positive),
    "teacher_grade_prompt": Key(list, chat_messages("context", "question", "answer")),
}

# The schema of raft.yaml; raft.yaml itself documents what each key means.
RAFT_SCHEMA: dict[str, Key] = {
    **SOURCE_KEYS,
    "questions_per_chunk": Key(int, positive),
    "num_distract_docs": Key(int, non_negative),
    "oracle_probability": Key(float, probability),
    "refusal_probability": Key(float, probability),
    "refusal_answer": Key(str),
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
    "quality": Key(dict, fields=QUALITY_KEYS),
}


# The schema of raft_eval_config.yaml (evaluation and chat; rag_prompt also for fine-tuning).
EVAL_SCHEMA: dict[str, Key] = {
    "eval_file": Key(str),
    "raft_run": Key(str),
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
    "reranker": Key(str),
    "rerank_depth": Key(int, positive),
    "rerank_weight": Key(float, probability),
    "rerank_mode": Key(str, one_of("pointwise", "listwise")),
    "rerank_max_tokens": Key(int, positive),
    "approximate_above": Key(int, positive),
    "index_cache": Key(str),
    "temperature": Key(float, non_negative),
    "answer_max_tokens": Key(int, positive),
    "judge_max_tokens": Key(int, positive),
    "judge_calibration": Key(bool),
    "groundedness": Key(bool),
    "groundedness_max_tokens": Key(int, positive),
    "judge_min_rate": Key(float, probability),
    "bootstrap_resamples": Key(int, positive),
    "raft_config": Key(str),
    **CLIENT_KEYS,
    "concurrency": Key(int, positive),
    "queue_size": Key(int, non_negative),
    "queue_wait": Key(float, positive),
    "max_request_bytes": Key(int, positive),
    "max_question_chars": Key(int, positive),
    "max_messages": Key(int, positive),
    "request_max_tokens": Key(int, positive),
    "allowed_hosts": Key(list, names),
    "allowed_origins": Key(list, names),
    "output": Key(str),
    "model_prompt": Key(list, chat_messages("question")),
    "rag_prompt": Key(list, chat_messages("instruction")),
    "judge_prompt": Key(list, chat_messages("question", "gold_answer", "answer")),
    "groundedness_prompt": Key(list, chat_messages("documents", "answer")),
    "rerank_prompt": Key(list, chat_messages("question", "passage")),
    "rerank_list_prompt": Key(list, chat_messages("question", "passages")),
}


RUN_RECORD = "raft_run.json"      # raft.py's record of a run's settings, beside its dataset


def generation_settings(raft_run: str, raft_config: str) -> tuple[dict, str]:
    """(the GENERATION_KEYS, where they were read): from raft_run, raft.py's output folder or its raft_run.json, when
    one is named; otherwise from the generation config raft_config (raft.yaml), the one place of their defaults."""
    if not raft_run:
        config = load_config(raft_config, RAFT_SCHEMA)
        return {name: config[name] for name in GENERATION_KEYS}, raft_config
    record = Path(raft_run) / RUN_RECORD if Path(raft_run).is_dir() else Path(raft_run)
    try:
        settings = json.loads(record.read_text(encoding="utf-8"))["config"]
        return {name: validate_value(str(record), name, settings[name], key)
                for name, key in GENERATION_KEYS.items()}, str(record)
    except OSError:
        raise ConfigError(f"raft_run {raft_run}: no {RUN_RECORD} there: name the output folder of a finished "
                          "raft.py run (--raft_run)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{record} is not a raft.py run record ({type(e).__name__}: {e}): name raft.py's "
                          "output folder with --raft_run") from None


def load_eval_config(path: str, flags) -> dict:
    """raft_eval_config.yaml with its flags, plus the generation run's sources, chunking and refusal answer
    (generation_settings), which the source flags override. cfg["sources_from"] says where they were read."""
    cfg = load_config_with_flags(path, EVAL_SCHEMA, flags)
    generation, origin = generation_settings(cfg["raft_run"], cfg["raft_config"])
    overrides = {name: getattr(flags, name, None) for name in SOURCE_KEYS}
    return {**cfg, **apply_overrides(generation, overrides, SOURCE_KEYS), "sources_from": origin}


# The schema of a fine-tuning recipe (finetune/configs/*.yaml, finetune/finetuning.py --config): a recipe sets any of
# these keys, every key is also a flag of the same name (the flag wins), and a key set by neither takes its default.
FINETUNE_SCHEMA: dict[str, Key] = {
    "model_name": Key(str, default="", help="Hugging Face model folder or name, or a .gguf file (required)"),
    "dataset": Key(str, one_of("raft"), default="raft", help="the dataset format"),
    "data_path": Key(list, strings, default=[], help="one or more raft.jsonl files, used together (required)"),
    "prompt_config": Key(str, default="raft_eval_config.yaml", help="YAML holding rag_prompt"),
    "enable_fsdp": Key(bool, default=False, help="shard with FSDP2 (needed for more than one process)"),
    "lr": Key(float, positive, default=1e-5, help="AdamW learning rate"),
    "weight_decay": Key(float, non_negative, default=0.0, help="AdamW weight decay"),
    "context_length": Key(int, positive, default=8192, help="tokens per row; longer examples are cut"),
    "num_epochs": Key(int, positive, default=1, help="passes over the training rows"),
    "batch_size_training": Key(int, positive, default=1, help="rows per micro-batch and process"),
    "gradient_accumulation_steps": Key(int, positive, default=1, help="micro-batches per optimizer step"),
    "batching_strategy": Key(str, one_of("packing", "padding"), default="packing",
                             help="packing: examples end to end in rows of context_length; padding: one per row"),
    "run_validation": Key(bool, default=True, help="hold out val_split of the questions and report their loss"),
    "val_split": Key(float, probability, default=0.1, help="share of records held out, whole questions at a time"),
    "mixed_precision": Key((str, bool), one_of("auto", True, False), default="auto",
                           help="bf16 compute with fp32 master weights: auto (where bf16 is native), true or false"),
    "pure_bf16": Key(bool, default=False, help="bf16 weights too (does not learn at lr 1e-5)"),
    "cpu_threads": Key(int, non_negative, default=0,
                       help="threads per process on a CPU (0: the usable cores / processes on the node)"),
    "gradient_checkpointing": Key(bool, default=False, help="recompute activations: less memory"),
    "use_fast_kernels": Key(bool, default=False, help="flash attention 2 where installed, else SDPA"),
    "max_steps": Key(int, non_negative, default=0, help="stop after this many optimizer steps in all (0: no limit)"),
    "seed": Key(int, default=42, help="seed of the data order and the model's randomness"),
    "dist_checkpoint_root_folder": Key(str, default="checkpoints", help="root of the run's checkpoint folder"),
    "dist_checkpoint_folder": Key(str, default="fine-tuned", help="the run's folder under the root"),
    "save_every": Key(int, non_negative, default=0, help="also checkpoint every N steps (0: at epoch ends)"),
    "resume": Key(bool, default=False, help="continue from the newest checkpoint in the folder (any number of ranks)"),
    "keep_checkpoints": Key(int, non_negative, default=2, help="keep the newest N step_* checkpoints (0: keep all)"),
    "save_checkpoints": Key(bool, default=True, help="false for a throughput measurement"),
    "log_every": Key(int, positive, default=10, help="record the training loss every N steps"),
    "use_peft": Key(bool, default=False, help="train a LoRA adapter instead of every weight"),
    "peft_method": Key(str, one_of("lora"), default="lora", help="the adapter kind"),
    "lora_r": Key(int, positive, default=8, help="rank of the LoRA update matrices"),
    "lora_alpha": Key(int, positive, default=32, help="LoRA scaling: the update is multiplied by alpha / r"),
    "lora_dropout": Key(float, probability, default=0.05, help="dropout on the LoRA input"),
    "lora_target_modules": Key(list, strings, default=["q_proj", "v_proj"],
                               help="linear layers that get an adapter (k_proj o_proj gate_proj up_proj down_proj: more)"),
    "use_wandb": Key(bool, default=False, help="also log to Weights & Biases (rank 0)"),
    "wandb_project": Key(str, default="raft-finetune", help="the Weights & Biases project"),
}


def load_recipe(path: Optional[str], schema: dict[str, Key], flags: dict) -> dict:
    """A recipe (any subset of the schema's keys, or no file), then the flags given, then the defaults."""
    settings = {name: key.default for name, key in schema.items()}
    if path:
        raw = _read_mapping(path)
        _reject_unknown(path, raw, schema)
        settings.update({name: validate_value(path, name, value, schema[name]) for name, value in raw.items()})
    return apply_overrides(settings, flags, schema)
