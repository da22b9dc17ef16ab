"""Generation, evaluation and chat against each real server's shapes (tests/personas.py): vLLM, the OpenAI API,
llama.cpp's server, Ollama's /v1 and TGI's /v1, over real HTTP."""
import json

import pytest

import chat
import raft
import raft_eval
from tests.conftest import write_corpus
from tests.fake_server import FakeOpenAI, Reply
from tests.personas import PERSONAS
from tests.test_raft_eval import GOLD, judge, student

THINKING = "Let me think about which document says it."


@pytest.fixture(params=PERSONAS)
def persona(request) -> str:
    return request.param


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generation(persona, tmp_path, capsys):
    """A whole raft.py run, and a re-run that asks nothing again (the model's fingerprint is the same)."""
    corpus = write_corpus(tmp_path / "corpus", n_docs=2, paragraphs=3)
    with FakeOpenAI(persona=persona) as teacher:
        assert raft.main(["-u", teacher.url, "--data_dir", str(corpus), "-t", "2", "-o", str(tmp_path / "a")]) == 0
        asked = len(teacher.requests)
        assert raft.main(["-u", teacher.url, "--data_dir", str(corpus), "-t", "2", "-o", str(tmp_path / "a")]) == 0
        assert len(teacher.requests) == asked
    assert f"0 sent, {asked} from the cache" in capsys.readouterr().out
    answers = [r for r in read_jsonl(tmp_path / "a" / "raft.jsonl") if r["id"].startswith("seed_task")]
    assert answers and all("<ANSWER>:" in r["cot_answer"] for r in answers)


def test_reasoning_is_never_the_answer_and_a_reply_cut_inside_it_is_asked_again(persona, tmp_path):
    """A reasoning teacher: the thinking comes in the server's own field (vLLM's reasoning, llama.cpp's
    reasoning_content, Ollama's reasoning) or as a <think> block (TGI); a reply cut inside it has no content."""
    corpus = write_corpus(tmp_path / "corpus", n_docs=2, paragraphs=3)

    def script(body, n):
        if body["max_tokens"] == 1024:      # the answers' first budget: cut inside the thinking
            return Reply(reasoning=THINKING, no_content=True, finish_reason="length")
        return Reply(reasoning=THINKING)
    with FakeOpenAI(persona=persona) as teacher:
        teacher.script = script
        assert raft.main(["-u", teacher.url, "--data_dir", str(corpus), "-t", "2", "-o", str(tmp_path / "a")]) == 0
        budgets = [b["max_tokens"] for b in teacher.requests if "Question:" in b["messages"][-1]["content"]]
    records = read_jsonl(tmp_path / "a" / "raft.jsonl")
    assert records and not any(THINKING in r["cot_answer"] or THINKING in r["question"] for r in records)
    assert budgets.count(1024) == budgets.count(2048) > 0          # each cut answer asked again, once
    counts = json.loads((tmp_path / "a" / "raft_run.json").read_text())["counts"]
    assert "answer request failed (empty reply)" not in counts["dropped"]


def test_evaluation_and_its_rerun_asks_nothing_again(persona, tmp_path):
    """vLLM's /v1/models changes its permission ids and times on every call: the fingerprint must not."""
    corpus = write_corpus(tmp_path / "corpus", n_docs=2, paragraphs=2)
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps([{"question": q, "answer": a} for q, a in GOLD.items()]))
    with FakeOpenAI(models=("student",), persona=persona) as s, FakeOpenAI(models=("judge",), persona=persona) as j:
        s.script, j.script = student, judge
        args = ["-u", s.url, "-j", j.url, "-d", str(corpus), "--eval_file", str(eval_file), "-o", str(tmp_path / "out"),
                "--retriever", "bm25", "-r", "2"]
        assert raft_eval.main(args) == 0
        asked = (len(s.requests), len(j.requests))
        assert raft_eval.main(args) == 0
        assert (len(s.requests), len(j.requests)) == asked
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["systems"]["student"]["rag_top2"]["exact_match"] == 0.25


def test_chat_streams_the_answer_only(persona, capsys):
    with FakeOpenAI(models=("raft-student",), persona=persona) as model:
        model.script = lambda body, n: Reply(content="Reasoning. ##begin_quote## 128K ##end_quote##\n<ANSWER>: 128K",
                                             reasoning=THINKING)
        code = chat.main(["-u", model.url, "--retriever", "bm25", "-r", "2", "--question", "What context length?",
                          "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["answer"] == "128K" and THINKING not in result["reply"]


def test_an_unknown_model_is_a_one_line_error(persona, tmp_path, capsys):
    """Each server's own not-found shape (llama.cpp serves whatever name it is asked for)."""
    corpus = write_corpus(tmp_path / "corpus", n_docs=2, paragraphs=3)
    with FakeOpenAI(persona=persona) as teacher:
        code = raft.main(["-u", teacher.url, "--data_dir", str(corpus), "-m", "llama-70b", "--no_preflight",
                          "-o", str(tmp_path / "a")])
    err = capsys.readouterr().err
    if persona == "llamacpp":
        assert code == 0
    else:
        assert code == 2 and "does not know model 'llama-70b' (HTTP 404)" in err and "Traceback" not in err
