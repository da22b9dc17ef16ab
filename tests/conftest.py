import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))

from tests.fake_server import FakeOpenAI  # noqa: E402


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


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")
