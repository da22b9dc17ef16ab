"""bench/raft_effect.py's whole path on tiny sizes: LLM-free questions, three fine-tunes with torchrun, GGUF
conversion, four llama.cpp servers, raft_eval.py, the report; then a run with fewer test questions that keeps the
trainings, and one that reuses every stage. The student is a 2-layer random Llama (conftest's tiny_model) as GGUF,
so its answers are noise: this checks the mechanics."""
import json
import subprocess
import sys

import pytest

from tests.conftest import LLAMA_SERVER, ROOT

sys.path.append(str(ROOT / "bench"))
from cloze import blanks, terms, whole_sentences  # noqa: E402


def test_a_blank_is_a_rare_term_of_a_whole_sentence_and_the_answer_quotes_it():
    chunks = ["The server listens on port 8000 by default. Its flag is --port and it takes",
              "Llama 3 was released by Meta in April 2024, with 8B and 70B sizes."]
    assert whole_sentences(chunks[0]) == ["The server listens on port 8000 by default."]    # the cut one is left out
    # not the first word, nor a single character
    assert terms(chunks[1]) == ["Meta", "April", "2024", "8B", "70B"]
    found = blanks(chunks, [0, 1], per_chunk=2, seed=0)
    assert [(c.chunk_index, c.term) for c in found][:1] == [(0, "8000")]
    first = found[0]
    assert first.question == 'Fill in the blank: "The server listens on port ____ by default."'
    assert "##begin_quote##The server listens on port 8000 by default.##end_quote##" in first.cot_answer
    assert first.cot_answer.endswith("<ANSWER>: 8000")
    assert len([c for c in found if c.chunk_index == 1]) == 2


@pytest.fixture
def tiny_gguf(tiny_model, tmp_path):
    from finetune.checkpoint_converter import to_gguf
    return to_gguf(tiny_model, str(tmp_path / "tiny.gguf"), "f32")


def test_the_whole_experiment_on_tiny_sizes(tiny_gguf, tmp_path):
    if not LLAMA_SERVER.exists():
        pytest.fail("the llama.cpp server is not set up: run `make setup` first")
    out = tmp_path / "experiment"
    cmd = [sys.executable, str(ROOT / "bench" / "raft_effect.py"), "--base_model", str(tiny_gguf),
           "--train_questions", "6", "--test_questions", "4", "--rag_topk", "1", "--answer_tokens", "16",
           "--processes", "1", "--output", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "4 test questions" in done.stdout and "11/11 report" in done.stdout
    test = json.loads((out / "data" / "test.json").read_text())
    assert len(test) == 4 and all(item["sentence"].replace(item["answer"], "____", 1) in item["question"]
                                  for item in test)
    rows = {name: (out / "data" / f"{name}.jsonl").read_text().splitlines() for name in ("raft", "raft_d0", "dsf")}
    assert {len(r) for r in rows.values()} == {6}
    assert json.loads(rows["raft"][0])["instruction"].count("<DOCUMENT>") == 5          # the oracle + 4 distractors
    assert json.loads(rows["dsf"][0])["instruction"].count("<DOCUMENT>") == 0
    result = json.loads((out / "raft_effect.json").read_text())
    assert list(result["systems"]) == ["raft", "raft_d0", "dsf", "base"]
    assert all(list(conditions) == ["no_rag", "rag_top1"] for conditions in result["systems"].values())
    # 3 pairs at 2 conditions, and the ablation at top-1
    assert len(result["comparisons"]) == 7
    report = (out / "raft_effect.md").read_text()
    assert "| raft | RAG top-1 |" in report and "## What became of the answers" in report
    assert (out / "raft_effect.png").stat().st_size > 0

    # Fewer test questions: the data, the base model, the trainings and conversions are kept; only the test runs.
    fewer = cmd + ["--test_questions", "3"]
    again = subprocess.run(fewer, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert again.stdout.count("reused") == 8 and "11/11 report ..." in again.stdout
    assert len((out / "eval" / "questions.jsonl").read_text().splitlines()) == 3
    once_more = subprocess.run(fewer, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert once_more.returncode == 0 and once_more.stdout.count("reused") == 11
