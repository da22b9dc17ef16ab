"""raft.py end to end against the scripted server over real HTTP."""
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import datasets
import psutil
import pytest
import yaml

import raft
from reply_cache import ResponseCache, cache_key
from tests.conftest import ROOT, write_corpus
from tests.fake_server import FakeOpenAI, Reply

RECORD_FIELDS = {"id", "type", "question", "context", "oracle_context", "cot_answer", "instruction",
                 "source", "oracle_present", "quotes_verified"}


def run_raft(fake, corpus, out, *extra):
    return raft.main(["-u", fake.url, "--data_dir", str(corpus), "-o", str(out), "-t", "2", *extra])


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def question_of(body):
    """The question of an answer request: the last message with 'Question: ...' (earlier ones are the example)."""
    asking = [m["content"] for m in body["messages"] if m["role"] == "user" and "Question:" in m["content"]]
    return asking[-1].rsplit("Question:", 1)[-1].strip()


def is_answer_request(body):
    return "##begin_quote##" in json.dumps(body["messages"])


def check_record(r):
    assert RECORD_FIELDS <= set(r)
    docs = r["context"]["sentences"][0]
    assert len(docs) == 5 and len(set(docs)) == 5
    assert r["instruction"] == "".join(f"<DOCUMENT>{d}</DOCUMENT>\n" for d in docs) + r["question"]
    assert r["id"].startswith(("seed_task_", "refusal_task_"))
    assert "<ANSWER>:" in r["cot_answer"] or r["id"].startswith("refusal_task_")


def test_full_run_writes_dataset_jsonl_and_settings(fake, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_raft(fake, corpus, out) == 0
    records = read_jsonl(out / "raft.jsonl")
    assert records and all(check_record(r) is None for r in records)
    assert datasets.load_from_disk(str(out)).to_list() == records          # save_to_disk holds the same
    assert all(r["quotes_verified"] for r in records if r["id"].startswith("seed"))
    n_chunks = sum(1 for b in fake.requests if not is_answer_request(b))
    assert sum(r["id"].startswith("seed") for r in records) == 2 * n_chunks   # -t 2, all distinct
    settings = json.loads((out / "raft_run.json").read_text())
    assert settings["teacher_model"] == "teacher" and settings["endpoints"] == [fake.url.rsplit("/v1", 1)[0]]
    assert settings["config"]["question_prompt"][0]["role"] == "system"
    assert settings["counts"]["examples"] == len(records)
    summary = capsys.readouterr().out
    assert f"examples         {len(records)}:" in summary and "requests         " in summary


def test_questions_are_capped_and_deduplicated_across_chunks(fake, corpus, tmp_path):
    def script(body, n):
        if not is_answer_request(body):
            return Reply(content="1. How long is the Rhine?\n2. What is shared by all chunks?\n3. What is shared by all chunks?\n"
                                 f"3. Unique question {n}?\n4. Another one {n}?\n5. Extra {n}?")
    fake.script = script
    assert run_raft(fake, corpus, tmp_path / "out") == 0
    questions = [r["question"] for r in read_jsonl(tmp_path / "out" / "raft.jsonl") if r["id"].startswith("seed")]
    assert questions.count("What is shared by all chunks?") == 1
    assert "How long is the Rhine?" not in questions          # copied from the prompt's worked example
    assert len(questions) == len(set(questions))
    per_source = {}
    for r in read_jsonl(tmp_path / "out" / "raft.jsonl"):
        per_source.setdefault(r["oracle_context"], set()).add(r["question"])
    assert max(len(q) for q in per_source.values()) <= 2


def test_answer_without_marker_is_retried_once_then_dropped(fake, corpus, tmp_path, capsys):
    def script(body, n):
        if not is_answer_request(body):
            return None
        question = question_of(body)
        retried = body["messages"][-1]["content"].startswith("Your reply has no final line")
        if "about Fact 0.0.0" in question:
            return Reply(content="I ramble without a final answer.")            # never fixed
        if "about Fact 1.0.0" in question and not retried:
            return Reply(content="Forgot the marker.")                          # fixed by the retry
        return None
    fake.script = script
    assert run_raft(fake, corpus, tmp_path / "out") == 0
    questions = {r["question"] for r in read_jsonl(tmp_path / "out" / "raft.jsonl")}
    assert not any("Fact 0.0.0" in q for q in questions)
    assert any("Fact 1.0.0" in q for q in questions)
    retries = [b for b in fake.requests if b["messages"][-1]["content"].startswith("Your reply has no final line")]
    assert len(retries) == 2 and retries[0]["messages"][-2]["role"] == "assistant"
    assert "1 answer without <ANSWER>: after a retry" in capsys.readouterr().out


def test_an_answer_quoting_what_its_chunk_lacks_is_filtered_out_or_flagged(fake, corpus, tmp_path):
    def script(body, n):
        if is_answer_request(body) and "Fact 2.0.0" in question_of(body):
            return Reply(content="##begin_quote## an invented sentence ##end_quote##\n<ANSWER>: invented")
    fake.script = script
    assert run_raft(fake, corpus, tmp_path / "drop") == 0
    kept = read_jsonl(tmp_path / "drop" / "raft.jsonl")
    filtered = read_jsonl(tmp_path / "drop" / "filtered_out.jsonl")
    assert kept and not any("Fact 2.0.0" in r["question"] for r in kept)
    assert filtered and all("Fact 2.0.0" in r["question"] and r["filter"] == "answer: quote not in the oracle chunk"
                            for r in filtered)
    config = yaml.safe_load((ROOT / "raft.yaml").read_text())
    config["quality"]["answer_checks"] = False             # kept, with quotes_verified false for the user to see
    (tmp_path / "flag.yaml").write_text(yaml.safe_dump(config))
    assert run_raft(fake, corpus, tmp_path / "flag", "-c", str(tmp_path / "flag.yaml")) == 0
    flagged = [r for r in read_jsonl(tmp_path / "flag" / "raft.jsonl") if r["quotes_verified"] is False]
    assert flagged and all("Fact 2.0.0" in r["question"] for r in flagged)


def test_too_few_chunks_fails_before_any_request(fake, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "small", n_docs=1, paragraphs=2)
    assert run_raft(fake, corpus, tmp_path / "out") == 2
    assert "each example needs 6 distinct chunks" in capsys.readouterr().err
    assert fake.requests == []


def test_no_documents_is_an_error_naming_the_skipped_files(fake, tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    assert run_raft(fake, tmp_path / "docs", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no documents could be read" in err and "broken.pdf: unreadable" in err


def test_api_key_from_environment_wins_over_flag(corpus, tmp_path, monkeypatch):
    with FakeOpenAI(api_key="from-env") as fake:
        monkeypatch.setenv("API_KEY", "from-env")
        assert run_raft(fake, corpus, tmp_path / "out", "-k", "wrong") == 0
        monkeypatch.delenv("API_KEY")
        assert run_raft(fake, corpus, tmp_path / "out2", "-k", "wrong") == 2
    assert "from-env" not in (tmp_path / "out" / "raft_run.json").read_text()
    assert b"from-env" not in (tmp_path / "out" / "llm_cache.sqlite").read_bytes()


def test_same_inputs_cache_and_seed_give_identical_bytes(fake, corpus, tmp_path):
    assert run_raft(fake, corpus, tmp_path / "a", "--cache_path", str(tmp_path / "c.sqlite")) == 0
    sent = len(fake.requests)
    assert run_raft(fake, corpus, tmp_path / "b", "--cache_path", str(tmp_path / "c.sqlite")) == 0
    assert len(fake.requests) == sent                                      # all from the cache
    assert (tmp_path / "a" / "raft.jsonl").read_bytes() == (tmp_path / "b" / "raft.jsonl").read_bytes()
    first = (tmp_path / "a" / "raft.jsonl").read_bytes()
    assert run_raft(fake, corpus, tmp_path / "a", "--cache_path", str(tmp_path / "c.sqlite")) == 0   # over itself
    for remover in [t for t in threading.enumerate() if t.name == "remove-old-output"]:
        remover.join()
    assert (tmp_path / "a" / "raft.jsonl").read_bytes() == first
    assert datasets.load_from_disk(str(tmp_path / "a")).to_list() == read_jsonl(tmp_path / "a" / "raft.jsonl")
    assert not list((tmp_path / "a").glob(".*.old"))                     # the earlier outputs are gone
    assert run_raft(fake, corpus, tmp_path / "c", "--cache_path", str(tmp_path / "c.sqlite"), "--seed", "7") == 0
    assert (tmp_path / "a" / "raft.jsonl").read_bytes() != (tmp_path / "c" / "raft.jsonl").read_bytes()


def test_killed_run_resumes_without_resending_finished_requests(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    with FakeOpenAI() as fake:
        fake.script = lambda body, n: Reply(delay=0.1)
        cmd = [sys.executable, str(ROOT / "raft.py"), "-u", fake.url, "--data_dir", str(corpus), "-t", "2",
               "--max_in_flight", "3"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        first = subprocess.Popen(cmd + ["-o", str(tmp_path / "resumed")], cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while len(fake.requests) < 14 and time.time() < deadline:
            time.sleep(0.02)
        writers = psutil.Process(first.pid).children()
        assert writers                                                  # the record writer process
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert not psutil.wait_procs(writers, timeout=10)[1], "the record writer outlived raft.py"
        finished = ResponseCache(str(tmp_path / "resumed" / "llm_cache.sqlite")).keys()
        assert 5 <= len(finished) < 14
        sent_before = len(fake.requests)
        fake.script = lambda body, n: None
        assert subprocess.run(cmd + ["-o", str(tmp_path / "resumed")], cwd=ROOT, env=env,
                              capture_output=True).returncode == 0
        teacher = json.loads((tmp_path / "resumed" / "raft_run.json").read_text())["teacher_fingerprint"]
        resent = [cache_key(b["model"], b["messages"], {k: v for k, v in b.items() if k not in ("model", "messages")},
                            teacher) for b in fake.requests[sent_before:]]
        assert set(resent) <= ResponseCache(str(tmp_path / "resumed" / "llm_cache.sqlite")).keys()
        assert not finished & set(resent)                     # nothing finished was asked again
        total_needed = len(set(resent) | finished)
        assert subprocess.run(cmd + ["-o", str(tmp_path / "straight")], cwd=ROOT, env=env,
                              capture_output=True).returncode == 0
        assert len(fake.requests) - sent_before - len(resent) == total_needed
    assert (tmp_path / "resumed" / "raft.jsonl").read_bytes() == (tmp_path / "straight" / "raft.jsonl").read_bytes()


def test_replies_cut_at_max_tokens_are_asked_again_with_twice_the_budget_then_dropped(fake, corpus, tmp_path, capsys):
    """A cut answer is never used: asked once more with twice max_tokens; if that is cut too, it is dropped."""
    answers = {}

    def script(body, n):
        if not is_answer_request(body):
            return None
        question = question_of(body)
        order = answers.setdefault(question, len(answers))
        if order == 0:                                   # always cut
            return Reply(content="A chain of thought that never", finish_reason="length")
        if order == 1 and body["max_tokens"] == 1024:    # cut at the configured budget, whole with twice of it
            return Reply(content="Half a thought", finish_reason="length")
        return None
    fake.script = script
    out = tmp_path / "out"
    assert run_raft(fake, corpus, out) == 0
    budgets = [b["max_tokens"] for b in fake.requests if is_answer_request(b) and answers.get(question_of(b)) in (0, 1)]
    assert sorted(budgets) == [1024, 1024, 2048, 2048]
    records = read_jsonl(out / "raft.jsonl")
    first, second = (question.splitlines()[0] for question in sorted(answers, key=answers.get)[:2])
    assert first not in {r["question"] for r in records} and second in {r["question"] for r in records}
    assert all("Half a thought" not in r["cot_answer"] for r in records)
    counts = json.loads((out / "raft_run.json").read_text())["counts"]
    assert counts["dropped"]["truncated: cut at max_tokens, also with twice the budget"] == 1
    assert counts["replies cut at max_tokens"] == 2
    assert "2 replies cut at max_tokens asked again with twice the budget" in capsys.readouterr().out


def test_any_window_size_gives_the_same_bytes(fake, corpus, tmp_path):
    """Windows bound the memory; the dataset does not depend on them (nor on the order replies come back)."""
    assert run_raft(fake, corpus, tmp_path / "one", "--cache_path", str(tmp_path / "c.sqlite")) == 0
    sent = len(fake.requests)
    assert run_raft(fake, corpus, tmp_path / "many", "--cache_path", str(tmp_path / "c.sqlite"),
                    "--window_chunks", "2") == 0
    assert len(fake.requests) == sent
    assert (tmp_path / "one" / "raft.jsonl").read_bytes() == (tmp_path / "many" / "raft.jsonl").read_bytes()
    assert datasets.load_from_disk(str(tmp_path / "many")).to_list() == read_jsonl(tmp_path / "many" / "raft.jsonl")
    assert not (tmp_path / "many" / "raft_records.partial.jsonl").exists()


def test_answers_are_asked_while_later_chunks_questions_are_still_out(corpus, tmp_path):
    """No barrier between the stages: with 2 requests in flight, the first chunk's answers go out before the
    last chunk's question (a barrier would send every question first)."""
    with FakeOpenAI(delay=0.05) as fake:
        assert run_raft(fake, corpus, tmp_path / "out", "--max_in_flight", "2") == 0
        kinds = ["answer" if is_answer_request(b) else "question" for b in fake.requests]
    assert kinds.index("answer") < len(kinds) - 1 - kinds[::-1].index("question")
    assert kinds.count("question") >= 6


def test_a_gateway_without_a_model_list_works_with_no_preflight(corpus, tmp_path, capsys):
    with FakeOpenAI() as fake:
        fake.models_listed = False
        assert run_raft(fake, corpus, tmp_path / "a") == 2
        assert "pass --no_preflight and -m" in capsys.readouterr().err
        assert run_raft(fake, corpus, tmp_path / "b", "--no_preflight") == 2
        assert "--no_preflight needs the model name: pass it with -m" in capsys.readouterr().err
        assert run_raft(fake, corpus, tmp_path / "c", "--no_preflight", "-m", "teacher") == 0
    assert read_jsonl(tmp_path / "c" / "raft.jsonl")


def test_ctrl_c_stops_both_processes_and_says_how_to_resume(corpus, tmp_path):
    with FakeOpenAI() as fake:
        fake.script = lambda body, n: Reply(delay=0.2)
        # A terminal's Ctrl-C goes to the whole process group; SIGINT restored in case this suite runs in the
        # background (which starts it ignored).
        run = subprocess.Popen([sys.executable, str(ROOT / "raft.py"), "-u", fake.url, "--data_dir", str(corpus),
                                "-o", str(tmp_path / "out"), "-t", "2", "--max_in_flight", "2"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 60
        while len(fake.requests) < 4 and time.time() < deadline:
            time.sleep(0.02)
        writers = psutil.Process(run.pid).children()
        os.killpg(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "interrupted: finished replies are kept in" in err and "Traceback" not in err
    assert writers and not psutil.wait_procs(writers, timeout=10)[1]
    assert not (tmp_path / "out" / "state.json").exists()          # the unfinished dataset is not marked done


def test_an_output_path_that_is_a_file_is_a_one_line_error(fake, corpus, tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    assert run_raft(fake, corpus, tmp_path / "taken") == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [f"error: cannot make the output folder {tmp_path / 'taken'} (File exists): choose another -o"]


@pytest.mark.parametrize("code, advice", [(errno.ENOSPC, "free space there"), (errno.EDQUOT, "free space there"),
                                          (errno.EACCES, "make the folder writable"),
                                          (errno.EROFS, "make the folder writable"), (errno.EIO, "choose another -o")])
def test_the_advice_for_a_failed_write_follows_its_cause(code, advice):
    # Permission errors cannot be provoked here (the tests may run as root), so the advice is checked by errno.
    assert raft.what_to_do_about(OSError(code, os.strerror(code))).startswith(advice)
