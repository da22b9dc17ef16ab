"""raft.py, raft_eval.py, chat.py and the LLM reranker against the real llama.cpp server with SmolLM2-135M-Instruct on data/ (about 3 minutes).

The server is started here with scripts/teacher.sh; `make setup` (or .ci/run) builds it and fetches the model.
A 135M model writes loose output, so this checks the format of whatever it produced, never exact counts.
"""
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import LLAMA_SERVER, ROOT, free_port
from tests.test_raft_cli import check_record

TEACHER = ROOT / "scripts" / "teacher.sh"


@pytest.fixture(scope="module")
def teacher_url():
    if not LLAMA_SERVER.exists():
        pytest.fail("the llama.cpp teacher is not set up: run `make setup` (scripts/teacher.sh setup) first")
    port = free_port()
    env = {**os.environ, "TEACHER_PORT": str(port)}
    started = subprocess.run([str(TEACHER), "start"], env=env, capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    yield f"http://127.0.0.1:{port}/v1"
    subprocess.run([str(TEACHER), "stop"], env=env, capture_output=True)


def test_generation_with_smollm2_on_the_demo_corpus(teacher_url, tmp_path):
    config = yaml.safe_load((ROOT / "raft.yaml").read_text())
    config.update(answer_max_tokens=320, question_max_tokens=160, refusal_probability=0.3)
    (tmp_path / "raft.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, str(ROOT / "raft.py"), "-c", str(tmp_path / "raft.yaml"), "-u", teacher_url,
           "-k", "EMPTY", "-t", "2", "--max_chunks", "4", "--data_dir", str(ROOT / "data"), "-o", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in open(tmp_path / "out" / "raft.jsonl")]
    assert records, "no example produced"
    for r in records:
        check_record(r)
        assert r["oracle_context"] in {*r["context"]["sentences"][0]} or not r["oracle_present"]
    seeds = [r for r in records if r["id"].startswith("seed_task_")]
    assert seeds and all(r["question"].strip() and r["cot_answer"].strip() for r in seeds)
    settings = json.loads((tmp_path / "out" / "raft_run.json").read_text())
    assert settings["teacher_model"] == "smollm2-135m-instruct"
    assert "examples" in done.stdout and "tokens" in done.stdout

    # The same command again is answered entirely from the cache and gives the same bytes.
    first = (tmp_path / "out" / "raft.jsonl").read_bytes()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 sent," in again.stdout
    assert (tmp_path / "out" / "raft.jsonl").read_bytes() == first


def test_evaluation_with_smollm2_as_model_and_judge(teacher_url, tmp_path):
    config = yaml.safe_load((ROOT / "raft_eval_config.yaml").read_text())
    config.update(answer_max_tokens=160, index_cache=str(tmp_path / "index"))
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, str(ROOT / "raft_eval.py"), "-c", str(tmp_path / "eval.yaml"), "-u", teacher_url,
           "-j", teacher_url, "-r", "2", "--limit", "3", "-o", str(tmp_path / "eval")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    conditions = result["systems"]["smollm2-135m-instruct"]
    assert list(conditions) == ["no_rag", "rag_top2"]
    for m in conditions.values():
        assert m["questions"] == 3 and m["failed_requests"] == 0
        assert 0 <= m["judge_score"] <= 1 and 0 <= m["rougeL"] <= 1 and 0 <= m["refusal_rate"] <= 1
        assert m["judge_yes"] + m["judge_unparseable"] <= 3
    log = [json.loads(line) for line in open(tmp_path / "eval" / "questions.jsonl")]
    assert len(log) == 3 and all(len(row["retrieved"]) == 2 for row in log)
    assert all(row["systems"]["smollm2-135m-instruct"]["rag_top2"]["reply"].strip() for row in log)
    assert (tmp_path / "eval" / "report.md").exists() and (tmp_path / "eval" / "judge_score.png").exists()
    # Verdicts on 6 answers and 12 controls (each question's gold answer, another's, the refusal, a near miss), and
    # the claims of the 3 answers given documents and of the 3 gold answers with a fabricated sentence added
    assert "requests judge smollm2-135m-instruct: 24 sent" in done.stdout
    calibration = result["judge_calibration"]
    assert calibration["right_controls"] == 3 and calibration["wrong_controls"] == 6
    assert "judge calibration (smollm2-135m-instruct, 9 control answers" in done.stdout
    assert "## Can the judge be trusted?" in (tmp_path / "eval" / "report.md").read_text()

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count(": 0 sent,") == 2   # the model and the judge: all cached


def test_chat_with_smollm2(teacher_url):
    cmd = [sys.executable, str(ROOT / "chat.py"), "-u", teacher_url, "-r", "3", "--max_tokens", "120", "--json",
           "--question", "What port does the vLLM server listen on by default?"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 3), done.stderr[-2000:]          # 3: the model declined and handed off
    result = json.loads(done.stdout)
    assert result["model"] == "smollm2-135m-instruct" and result["reply"].strip()
    assert result["handoff"] == (done.returncode == 3) and len(result["sources"]) == 3
    # the hybrid retriever puts the serving guide among the three chunks
    assert any(s["source"].endswith("serving_llama.html") for s in result["sources"])


@pytest.mark.parametrize("mode", ["pointwise", "listwise"])
def test_the_llm_reranker_with_smollm2(teacher_url, tmp_path, mode):
    """Whatever a 135M model replies, every candidate gets a score, the order is a permutation of the first stage's,
    an unreadable reply counts as such, and the same question again is answered from the cache."""
    from config import EVAL_SCHEMA, load_config
    from documents import load_chunks
    from llm_client import ChatClient
    from rerank import LLMScorer, Reranked
    from retrieval import build_retriever
    cfg = load_config(str(ROOT / "raft_eval_config.yaml"), EVAL_SCHEMA)
    _, chunks, _ = load_chunks(str(ROOT / "data"), "", True, 1000)
    client = ChatClient([teacher_url], model="smollm2-135m-instruct", cache_path=str(tmp_path / "rerank.sqlite"))
    prompt = cfg["rerank_prompt" if mode == "pointwise" else "rerank_list_prompt"]
    scorer = LLMScorer(client, mode, prompt, {"temperature": 0.0, "max_tokens": cfg["rerank_max_tokens"]})
    first = build_retriever(chunks, "bm25")
    reranked = Reranked(first, scorer, chunks, depth=4, weight=1.0)
    question = "What port does the vLLM server listen on by default?"
    order = reranked.rank([question], 6)[0]
    assert sorted(order[:4]) == sorted(first.rank([question], 6)[0][:4]) and len(order) == 6
    assert client.usage.sent == (4 if mode == "pointwise" else 1) and client.usage.failed == 0
    assert 0 <= scorer.unreadable <= client.usage.sent
    assert reranked.rank([question], 6)[0] == order and client.usage.sent == (4 if mode == "pointwise" else 1)
    client.close()
