"""chat.py against the scripted server over real HTTP: the answer part, hand-off, sources, errors, interactive use."""
import json
import signal
import subprocess
import sys
import time

import pytest

import chat
from tests.conftest import ROOT, write_run
from tests.fake_server import FakeOpenAI, Reply
from tests.test_metrics import REFUSAL

QUESTION = "What context length does Llama 3.1 support?"
COT = "The documents say so. ##begin_quote## 128K ##end_quote## So:\n<ANSWER>: 128K tokens"


@pytest.fixture
def server():
    with FakeOpenAI(models=("raft-student",)) as s:
        s.script = lambda body, n: Reply(content=COT)
        yield s


def ask(server, capsys, *extra):
    code = chat.main(["-u", server.url, "--retriever", "bm25", "-r", "2", "--question", QUESTION, *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_shows_the_answer_part_and_uses_retrieved_documents(server, capsys):
    code, out, _ = ask(server, capsys)
    assert code == 0 and out == "128K tokens\n"
    [body] = server.requests
    user = body["messages"][-1]["content"]
    assert body["stream"] is True and user.count("<DOCUMENT>") == 2 and user.endswith(QUESTION)
    assert "128K" in user                        # bm25 found the chunk about Llama 3.1's context


def test_show_reasoning_and_sources(server, capsys):
    code, out, _ = ask(server, capsys, "--show-reasoning", "--sources")
    lines = out.splitlines()
    assert code == 0 and out.startswith(COT + "\n")
    assert lines[-2].startswith("  [1] data/") and lines[-1].startswith("  [2] data/")


def test_the_chat_searches_the_documents_of_the_generation_run(server, capsys, corpus, tmp_path):
    """--raft_run: the run's documents, chunk size and refusal answer, none of them repeated by hand."""
    run = write_run(tmp_path / "run", data_dir=str(corpus), chunk_size=300, refusal_answer="Ask the support desk.")
    server.script = lambda body, n: Reply(content="Nothing here.\n<ANSWER>: Ask the support desk.")
    code, out, _ = ask(server, capsys, "--raft_run", str(run), "--json")
    result = json.loads(out)
    assert code == chat.EXIT_HANDOFF and result["handoff"] is True
    assert all(s["source"].startswith(str(corpus)) and len(s["text"]) <= 300 for s in result["sources"])


def test_an_answer_is_marked_by_how_much_of_it_is_quoted_from_its_sources(server, capsys):
    code, out, _ = ask(server, capsys, "--json")
    result = json.loads(out)
    assert result["quote_support"] == 1.0 and result["unquoted"] is False      # "128K" is in the chunk it was given
    server.script = lambda body, n: Reply(content="As I recall. ##begin_quote## 2048 tokens ##end_quote##\n<ANSWER>: 2K")
    code, out, _ = ask(server, capsys)
    assert code == 0 and out.splitlines()[-1].startswith("[unquoted] No part of this answer is quoted")
    server.script = lambda body, n: Reply(content="<ANSWER>: 2K")                 # no quote at all
    result = json.loads(ask(server, capsys, "--json")[1])
    assert result["quote_support"] is None and result["unquoted"] is True


def test_json_mode(server, capsys):
    code, out, _ = ask(server, capsys, "--json")
    result = json.loads(out)
    assert code == 0 and result["answer"] == "128K tokens" and result["handoff"] is False
    assert result["model"] == "raft-student" and result["reply"] == COT and result["answer_marked"]
    assert [s["rank"] for s in result["sources"]] == [1, 2] and all(s["text"] for s in result["sources"])


@pytest.mark.parametrize("reply", [f"Reasoning without the answer.\n<ANSWER>: {REFUSAL}", "I don't know."])
def test_refusal_is_handed_off(server, capsys, reply):
    server.script = lambda body, n: Reply(content=reply)
    code, out, _ = ask(server, capsys)
    assert code == chat.EXIT_HANDOFF and out.splitlines()[-1] == chat.HANDOFF
    code, out, _ = ask(server, capsys, "--json")
    assert code == chat.EXIT_HANDOFF and json.loads(out)["handoff"] is True


def test_no_rag_and_a_reply_without_the_marker(server, capsys):
    server.script = lambda body, n: Reply(content="Llama 3.1 reads 128K tokens.")
    code, out, _ = ask(server, capsys, "--no-rag")
    assert code == 0 and out == "Llama 3.1 reads 128K tokens.\n"        # a base model's reply is shown whole
    assert "<DOCUMENT>" not in json.dumps(server.requests[-1]["messages"])


def test_dead_server_and_bad_flags_are_one_line_errors(capsys):
    assert chat.main(["-u", "http://127.0.0.1:9/v1", "--retriever", "bm25", "--question", QUESTION]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot reach http://127.0.0.1:9")
    assert chat.main(["--json", "--retriever", "bm25"]) == 2
    assert "--json needs --question" in capsys.readouterr().err


def interactive(server, stdin, *extra, **popen):
    return subprocess.Popen([sys.executable, str(ROOT / "chat.py"), "-u", server.url, "--retriever", "bm25", *extra],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def test_interactive_session_survives_empty_lines_and_a_failing_server(server):
    server.script = lambda body, n: Reply(content=COT) if n == 0 else Reply(status=500)
    session = interactive(server, None)
    out, err = session.communicate("\n\n" + QUESTION + "\nAnd another question?\n\nexit\n", timeout=120)
    assert session.returncode == 0, err
    assert "bot> 128K tokens" in out and "error:" in out and "500" in out and "Traceback" not in out + err


def test_ctrl_c_stops_an_answer_not_the_chat(server):
    """Also when the chat inherits SIGINT ignored, as a process started from a background job does (the suite
    failed here when it was itself started in the background)."""
    server.script = lambda body, n: Reply(content=COT, delay=30 if n == 0 else 0)
    session = interactive(server, None, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    session.stdin.write(QUESTION + "\n")
    session.stdin.flush()
    deadline = time.time() + 60
    while not server.requests and time.time() < deadline:      # the question has reached the server
        time.sleep(0.1)
    time.sleep(0.5)           # and the chat waits for the reply (once, on a loaded machine, a Ctrl-C sent at once was lost)
    interrupted = time.time()
    session.send_signal(signal.SIGINT)
    out, err = session.communicate(QUESTION + "\n", timeout=120)
    assert session.returncode == 0, err
    assert "(stopped)" in out and "bot> 128K tokens" in out and "Traceback" not in out + err, \
        f"{time.time() - interrupted:.1f} s after the SIGINT; stdout: {out!r}; stderr: {err!r}"


def test_model_path_runs_the_model_in_process(tiny_model, capsys):
    """No server: a Hugging Face folder loaded with transformers (a random tiny model: any text will do). Run as a
    process of its own, so that a generation thread left running at exit would show as a crash."""
    done = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model_path", str(tiny_model), "--retriever", "bm25",
                           "-r", "1", "--max_tokens", "8", "--question", QUESTION, "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, chat.EXIT_HANDOFF), done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["model"] == tiny_model.name and result["reply"]
    assert chat.main(["--model_path", str(ROOT / "data"), "--retriever", "bm25", "--question", QUESTION]) == 2
    assert "is not a Hugging Face model folder" in capsys.readouterr().err
