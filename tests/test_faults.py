"""Faults provoked for real: a full filesystem (a small tmpfs mounted by the test), a second run into a held folder,
a killed run, a replica killed mid-run, a teacher swapped under the same name, an earlier version's cache."""
import contextlib
import json
import multiprocessing.context
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import raft
import raft_eval
from reply_cache import ResponseCache, cache_key
from tests.conftest import ROOT, free_port, write_corpus
from tests.fake_server import FakeOpenAI, Reply
from tests.test_raft_eval import GOLD


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str):
    """A tmpfs of `size` mounted at `folder` for the block, or None where this machine does not allow mounting
    (not root, no CAP_SYS_ADMIN)."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        yield folder if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def raft_cmd(url, corpus, out, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "raft.py"), "-u", url, "--data_dir", str(corpus), "-o", str(out), "-t", "2",
            *extra]


def without_quality_filters(folder: Path) -> str:
    """A raft.yaml with the quality filters off: the faults these tests provoke are the writer's and the server's."""
    config = yaml.safe_load((ROOT / "raft.yaml").read_text())
    config["quality"].update(answer_checks=False, question_checks=False, duplicates=False, round_trip=False)
    (folder / "raft.yaml").write_text(yaml.safe_dump(config))
    return str(folder / "raft.yaml")


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ---- a full disk ------------------------------------------------------------------------------------------------
def test_a_full_disk_ends_the_run_at_once_with_a_one_line_error(tmp_path):
    """The record writer fails while many windows are left (its first batch of format.BATCH records is written
    after about 500 chunks); raft.py ends within seconds (it used to wait forever for the writer to take the next
    window), with the one-line advice and exit code 2."""
    corpus = write_corpus(tmp_path / "corpus", n_docs=60, paragraphs=20)      # 1,200 chunks: 60 windows of 20
    with small_filesystem(tmp_path / "disk", "256k") as disk, FakeOpenAI() as fake:
        out = (disk or tmp_path) / "out"
        if disk is None:         # no tmpfs here: every write of the records goes to /dev/full (ENOSPC)
            (tmp_path / "full").mkdir()
            (tmp_path / "full" / raft.STREAM).symlink_to("/dev/full")
            out.mkdir()
            (out / raft.STAGING).symlink_to(tmp_path / "full")
        started = time.time()
        run = subprocess.run(raft_cmd(fake.url, corpus, out, "--window_chunks", "20", "--cache_path",
                                      str(tmp_path / "cache.sqlite"), "-c", without_quality_filters(tmp_path)),
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        seconds = time.time() - started
        line = one_error_line(run.stderr)
        assert run.returncode == 2 and "No space left on device" in line and "free space there" in line
        assert seconds < 30, f"raft.py took {seconds:.0f} s to stop after the disk filled"
        if disk is not None:
            assert not (out / raft.STAGING).exists()       # the partial outputs are removed: the space is back


def test_a_full_cache_disk_is_a_one_line_error_and_the_run_resumes_once_space_is_freed(tmp_path, corpus):
    with small_filesystem(tmp_path / "disk", "1m") as disk, FakeOpenAI() as fake:
        if disk is None:
            pytest.skip("mounting a tmpfs is not allowed on this machine: the full cache cannot be provoked")
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (1024 * 1024 - 96 * 1024))          # 96 KB left for the cache
        cache = disk / "cache.sqlite"
        first = subprocess.run(raft_cmd(fake.url, corpus, tmp_path / "out", "--cache_path", str(cache)), cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        line = one_error_line(first.stderr)
        assert first.returncode == 2 and line.startswith(f"error: the reply cache {cache} could not be written")
        assert "full" in line and "the same command resumes" in line
        kept = len(ResponseCache(str(cache)))                          # still readable, with what it had
        assert kept > 0
        asked = len(fake.requests)
        filler.unlink()
        second = subprocess.run(raft_cmd(fake.url, corpus, tmp_path / "out", "--cache_path", str(cache)), cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr[-2000:]
        assert f"{kept} from the cache" in second.stdout
        assert len(fake.requests) - asked == len(ResponseCache(str(cache))) - kept


# ---- the previous outputs and the lock ------------------------------------------------------------------------
def outputs(folder: Path) -> dict:
    names = ("raft.jsonl", "raft_run.json", "state.json", "dataset_info.json", "data-00000-of-00001.arrow")
    return {name: (folder / name).read_bytes() for name in names}


def test_a_failed_or_stopped_run_leaves_the_previous_outputs_as_they_were(tmp_path, corpus):
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert raft.main(["-u", fake.url, "--data_dir", str(corpus), "-o", str(out), "-t", "2"]) == 0
        before = outputs(out)
        assert raft.main(["-u", "http://127.0.0.1:1/v1", "--data_dir", str(corpus), "-o", str(out)]) == 2
        assert outputs(out) == before
        fake.script = lambda body, n: Reply(delay=0.2)
        asked_before = len(fake.requests)
        run = subprocess.Popen(raft_cmd(fake.url, corpus, out, "--seed", "7", "--max_in_flight", "2", "--cache_path",
                                        str(tmp_path / "another.sqlite")), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        wait_for(lambda: len(fake.requests) > asked_before + 8)           # stopped in the middle of the questions
        os.killpg(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=60)
        assert run.returncode == 130 and "previous outputs are unchanged" in err
        assert outputs(out) == before and not (out / raft.STAGING).exists()
        fake.script = lambda body, n: None
        assert raft.main(["-u", fake.url, "--data_dir", str(corpus), "-o", str(out), "-t", "2", "--seed", "7"]) == 0
        assert outputs(out)["raft.jsonl"] != before["raft.jsonl"]     # a finished run does replace them


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """Python's own SIGINT handler (KeyboardInterrupt): a suite started in the background inherits SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_while_the_record_writer_starts_is_not_lost(tmp_path, corpus, monkeypatch, ctrl_c_as_in_a_terminal):
    # The writer is forked with Ctrl-C held back; a Ctrl-C in that moment once went unseen and the run went on.
    fork = multiprocessing.context.ForkProcess.start

    def start_during_a_ctrl_c(process):
        # To this thread: in raft.py it is the only one at that point (here the fake server's would take it).
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        fork(process)
    monkeypatch.setattr(multiprocessing.context.ForkProcess, "start", start_during_a_ctrl_c)
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        assert raft.main(["-u", fake.url, "--data_dir", str(corpus), "-o", str(out)]) == 130
        assert not fake.requests and not (out / raft.STAGING).exists() and not (out / "raft.jsonl").exists()


def wait_for(condition, seconds: float = 60):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_second_run_into_a_held_folder_stops_at_once_and_a_killed_run_leaves_no_lock(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    with FakeOpenAI() as fake:
        fake.script = lambda body, n: Reply(delay=0.5)
        first = subprocess.Popen(raft_cmd(fake.url, corpus, out, "--max_in_flight", "1"), cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: len(fake.requests) > 0)
        started = time.time()
        assert raft.main(["-u", fake.url, "--data_dir", str(corpus), "-o", str(out)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert time.time() - started < 10
        assert line == f"error: {out} is in use by another run (pid {first.pid}, raft.py): wait for it to end, " \
                       "or choose another output folder (-o)"
        first.send_signal(signal.SIGKILL)
        first.wait()
        fake.script = lambda body, n: None
        assert raft.main(["-u", fake.url, "--data_dir", str(corpus), "-o", str(out), "-t", "2"]) == 0


def test_two_evaluations_into_one_folder(tmp_path, corpus, capsys):
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps([{"question": q, "answer": a} for q, a in GOLD.items()]))
    with FakeOpenAI(models=("student",)) as s, FakeOpenAI(models=("judge",)) as j:
        s.script = lambda body, n: Reply(content="<ANSWER>: 42 units", delay=0.5)
        args = ["-u", s.url, "-j", j.url, "-d", str(corpus), "--eval_file", str(eval_file), "-o",
                str(tmp_path / "eval"), "--retriever", "bm25", "-r", "2", "--max_in_flight", "1"]
        first = subprocess.Popen([sys.executable, str(ROOT / "raft_eval.py"), *args], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: len(s.requests) > 0)
        assert raft_eval.main(args) == 2
        assert "is in use by another run (pid" in one_error_line(capsys.readouterr().err)
        assert first.wait(timeout=120) == 0


# ---- the teacher's identity in raft.py's cache ------------------------------------------------------------------
def test_a_teacher_swapped_under_the_same_name_is_asked_again(tmp_path, corpus, capsys):
    """llama.cpp keeps the alias when it loads another file (scripts/teacher.sh); vLLM users reuse
    --served-model-name: the cache knows the model by what its server says about the weights."""
    cache = str(tmp_path / "cache.sqlite")
    run = ["--data_dir", str(corpus), "-t", "2", "--cache_path", cache]
    with FakeOpenAI(persona="llamacpp", model_path="/models/small.gguf") as small:
        assert raft.main(["-u", small.url, "-o", str(tmp_path / "a"), *run]) == 0
        asked = len(small.requests)
    with FakeOpenAI(persona="llamacpp", model_path="/models/small.gguf") as same:        # restarted, new port
        assert raft.main(["-u", same.url, "-o", str(tmp_path / "b"), *run]) == 0
        assert same.requests == []
    assert f"0 sent, {asked} from the cache" in capsys.readouterr().out
    with FakeOpenAI(persona="llamacpp", model_path="/models/large.gguf") as large:        # same alias, new weights
        assert raft.main(["-u", large.url, "-o", str(tmp_path / "c"), *run]) == 0
        assert len(large.requests) == asked
    assert f"{asked} sent, 0 from the cache" in capsys.readouterr().out


def test_an_earlier_versions_cache_answers_the_model_it_was_written_with_only(tmp_path, corpus):
    """A cache whose keys have no fingerprint (raft.py before 0.2) is adopted by the first model that opens it."""
    cache = tmp_path / "old.sqlite"
    with FakeOpenAI(persona="vllm") as first:
        assert raft.main(["-u", first.url, "--data_dir", str(corpus), "-t", "2", "-o", str(tmp_path / "a"),
                          "--cache_path", str(cache)]) == 0
        asked = len(first.requests)
        bodies = list(first.requests)
    teacher = fingerprint_of(tmp_path / "a")
    db = sqlite3.connect(cache)                       # rewrite its keys as the earlier version wrote them
    for body in bodies:
        params = {k: v for k, v in body.items() if k not in ("model", "messages")}
        db.execute("UPDATE replies SET key = ? WHERE key = ?", (cache_key(body["model"], body["messages"], params),
                                                              cache_key(body["model"], body["messages"], params, teacher)))
    db.execute("DROP TABLE meta")
    db.commit()
    db.close()
    with FakeOpenAI(persona="vllm") as same:
        assert raft.main(["-u", same.url, "--data_dir", str(corpus), "-t", "2", "-o", str(tmp_path / "b"),
                          "--cache_path", str(cache)]) == 0
        assert same.requests == []                                    # the old replies answer their model
    assert (tmp_path / "a" / "raft.jsonl").read_bytes() == (tmp_path / "b" / "raft.jsonl").read_bytes()
    with FakeOpenAI(persona="vllm", model_info={"root": "/models/another"}) as other:
        assert raft.main(["-u", other.url, "--data_dir", str(corpus), "-t", "2", "-o", str(tmp_path / "c"),
                          "--cache_path", str(cache)]) == 0
        assert len(other.requests) == asked                           # never another model


def fingerprint_of(output: Path) -> str:
    return json.loads((output / "raft_run.json").read_text())["teacher_fingerprint"]


# ---- replicas ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def server_process(persona: str = "vllm", delay: float = 0.0):
    """The scripted server as a process of its own, to be killed for real: (url, process)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tests.fake_server", "--port", str(port), "--persona", persona,
                                "--delay", str(delay)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout.readline().startswith("serving"), "the server process did not start"
        yield f"http://127.0.0.1:{port}/v1", process
    finally:
        process.kill()
        process.wait()


def test_a_replica_killed_mid_run_is_taken_out_and_nothing_is_lost(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=4, paragraphs=3)
    with server_process(delay=0.05) as (a, killed), server_process(delay=0.05) as (b, _), \
            FakeOpenAI(persona="vllm") as reference:
        out = tmp_path / "out"
        run = subprocess.Popen(raft_cmd(a, corpus, out, "-u", b, "--max_in_flight", "4"), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: (out / "llm_cache.sqlite").exists() and len(ResponseCache(str(out / "llm_cache.sqlite"))) > 4)
        killed.kill()
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
        assert f"replica          {a.rsplit('/v1', 1)[0]}: out of rotation" in stdout
        assert raft.main(["-u", reference.url, "--data_dir", str(corpus), "-t", "2", "-o",
                          str(tmp_path / "straight")]) == 0
    assert (out / "raft.jsonl").read_bytes() == (tmp_path / "straight" / "raft.jsonl").read_bytes()


def test_preflight_with_a_replica_down_warns_and_proceeds_and_with_all_down_fails(tmp_path, corpus, capsys):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with FakeOpenAI() as alive:
        assert raft.main(["-u", dead, "-u", alive.url, "--data_dir", str(corpus), "-t", "2",
                          "-o", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert f"warning: replica {dead.rsplit('/v1', 1)[0]} does not answer" in err
    other_dead = f"http://127.0.0.1:{free_port()}/v1"
    assert raft.main(["-u", dead, "-u", other_dead, "--data_dir", str(corpus), "-o", str(tmp_path / "b")]) == 2
    assert "none of the 2 replicas answered" in one_error_line(capsys.readouterr().err)
