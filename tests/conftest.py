import json
import random
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"      # fetched by scripts/teacher.sh setup
LLAMA_SERVER = ROOT / ".venv-teacher" / "llama.cpp-build" / "bin" / "llama-server"    # built by it
sys.path.insert(0, str(ROOT))

from tests.fake_server import FakeOpenAI  # noqa: E402


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_terminal_summary(terminalreporter):
    """After failures, the free disk space: a full disk fails many unrelated tests at their setup."""
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        folder = tempfile.gettempdir()
        free = shutil.disk_usage(folder).free / 2**30
        terminalreporter.write_line(f"free disk space in {folder} now: {free:.1f} GiB "
                                    "(the suite needs about 3 GiB at its peak)")


@pytest.fixture
def fake():
    with FakeOpenAI() as server:
        yield server


def write_corpus(folder: Path, n_docs: int = 3, paragraphs: int = 3, seed: int = 0) -> Path:
    """Markdown files of distinct factual-looking sentences: about n_docs * paragraphs chunks of ~1000 chars."""
    rng = random.Random(seed)
    things = ["context window", "tokenizer", "learning rate", "GPU memory", "licence", "batch size"]
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        text = "\n\n".join(
            " ".join(f"Fact {d}.{p}.{s}: the {rng.choice(things)} of model {d} is {rng.randint(1, 9999)} units."
                     for s in range(14))
            for p in range(paragraphs))
        (folder / f"doc{d}.md").write_text(text)
    return folder


def write_run(folder: Path, **config) -> Path:
    """A generation run's record as raft.py writes it (raft_run.json, its settings under "config"): raft.yaml's
    values with `config` changed."""
    import yaml
    folder.mkdir(parents=True, exist_ok=True)
    settings = {**yaml.safe_load((ROOT / "raft.yaml").read_text()), **config}
    (folder / "raft_run.json").write_text(json.dumps({"tool": "raft-toolkit", "config": settings}))
    return folder


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")


def save_random_llama(folder: Path, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                      max_position_embeddings: int) -> Path:
    """A randomly initialised Llama of the given shape (seed 0) saved as a Hugging Face folder, with SmolLM2's real
    tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """2 layers of hidden 64: fast enough for every trainer and chat test."""
    return save_random_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, max_position_embeddings=1024)
