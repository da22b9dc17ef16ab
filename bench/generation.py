"""How fast does generation talk to a server? Prints numbers; asserts nothing.

  .venv/bin/python bench/generation.py                 # loopback part + real llama.cpp part
  .venv/bin/python bench/generation.py --skip-real     # loopback part only

1. Loopback: a scripted OpenAI-compatible server (its own process) answers every request after a fixed delay
   with unlimited parallelism. N requests go through this project's client at 1, 8 and 64 in flight, and
   through LangChain's ChatOpenAI.batch called the way the reference raft_utils.py calls it (default settings).
   Each is printed against the limit N x delay / in-flight, and against the reference. Each way first sends
   one warm-up batch, so that connection set-up is not timed for either.
2. End to end: raft.py itself, a new process as a user runs it, on a synthetic corpus of 383 chunks (327K
   characters) against the same loopback server, at 32 and 64 requests in flight: its wall time against the
   server-bound limit (requests x delay / in flight), start-up, loading and writing included.
3. Real: raft.py on the first 20 chunks of data/ with SmolLM2-135M-Instruct, side by side on llama.cpp's C++
   llama-server (8 parallel slots, the default of scripts/teacher.sh) and llama-cpp-python's Python server (one
   request at a time; scripts/teacher.sh setup-python-server installs it): chunks per minute and tokens per
   second (started here unless --teacher-url is given).
"""
import argparse
import contextlib
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_client import ChatClient  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, seconds: float = 30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(url + "/models", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"server at {url} did not come up")


@contextlib.contextmanager
def loopback_server(delay: float):
    """bench/loopback_server.py on a free port, answering every request after `delay` seconds; yields its URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "bench" / "loopback_server.py"), str(port), str(delay)],
                              stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_up(url)
        yield url
    finally:
        server.terminate()
        server.wait()


def prompts(n: int, tag: str) -> list[str]:
    return [f"[{tag}] Write one question about chunk {i}." for i in range(n)]


def time_project_client(url: str, n: int, in_flight: int, repeats: int) -> float:
    """Median over `repeats` timed batches, after one warm-up batch."""
    client = ChatClient([url], model="teacher", max_in_flight=in_flight)   # no cache: every request is sent
    client.preflight()

    def batch(tag, count):
        return [([{"role": "user", "content": p}], {"temperature": 0.0, "max_tokens": 500}) for p in prompts(count, tag)]
    # Warm-up: open the connections first, as they are after raft.py's first stage; both ways get one.
    client.complete_all(batch(f"warm-{in_flight}", in_flight), "warm-up")
    times = []
    for repeat in range(repeats):
        started = time.perf_counter()
        results = client.complete_all(batch(f"ours-{in_flight}-{repeat}", n), f"project client, {in_flight} in flight")
        times.append(time.perf_counter() - started)
        assert all(r.text for r in results), "benchmark server failed a request"
    client.close()
    return statistics.median(times)


def time_reference(url: str, n: int) -> float:
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(api_key="EMPTY", base_url=url, model="teacher", temperature=0.0, max_tokens=500)
    llm.batch(prompts(32, "reference-warm-up"))
    started = time.perf_counter()
    llm.batch(prompts(n, "reference"))
    return time.perf_counter() - started


def loopback(n: int, delay: float, repeats: int):
    with loopback_server(delay) as url:
        rows = []
        for in_flight in (1, 8, 64):
            # One run at 1 in flight (it takes n x delay); the median of `repeats` for the short ones.
            seconds = time_project_client(url, n, in_flight, 1 if in_flight == 1 else repeats)
            rows.append((f"project client, {in_flight} in flight", in_flight, seconds))
        reference = time_reference(url, n)
    print(f"\n== Loopback: {n} requests, server delay {delay * 1000:.0f} ms, unlimited server parallelism "
          f"(8 and 64 in flight: median of {repeats} runs)")
    print(f"{'client':34} {'seconds':>8} {'limit s':>8} {'of limit':>9} {'req/s':>7} {'vs reference':>13}")
    for name, in_flight, seconds in rows:
        limit = n * delay / in_flight
        print(f"{name:34} {seconds:8.2f} {limit:8.2f} {limit / seconds:9.2f} {n / seconds:7.1f} {reference / seconds:12.1f}x")
    print(f"{'LangChain ChatOpenAI.batch (ref.)':34} {reference:8.2f} {'':>8} {'':>9} {n / reference:7.1f} {1.0:12.1f}x")


def write_corpus(folder: Path, paragraphs: int, chars: int = 854) -> Path:
    """Markdown files of distinct paragraphs of about `chars` characters: one chunk of raft.py's default 1000
    characters each (383 paragraphs of 854: the 327K characters, 383 chunks of the measured workload)."""
    folder.mkdir(parents=True, exist_ok=True)
    words = "llama model token context window layer attention tensor shard gradient batch licence guard".split()
    for doc in range(0, paragraphs, 50):
        text = []
        for p in range(doc, min(doc + 50, paragraphs)):
            sentence = lambda s: f"Fact {p}.{s}: the {words[(p + s) % len(words)]} of item {p} measures {p * 7 + s} units. "
            paragraph = "".join(sentence(s) for s in range(40))[:chars].rsplit(" ", 1)[0] + "."
            text.append(paragraph)
        (folder / f"doc{doc // 50:03d}.md").write_text("\n\n".join(text))
    return folder


def end_to_end(delay: float, chunks: int, in_flight: int):
    """raft.py as a user runs it (a new process: start-up, loading, the stages, writing the outputs) against the
    loopback server: wall time against the server-bound limit requests x delay / in flight."""
    with loopback_server(delay) as url, tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus", chunks)
        cmd = [sys.executable, str(ROOT / "raft.py"), "-u", url, "-t", "4", "--data_dir", str(corpus),
               "--max_in_flight", str(in_flight), "-o", str(Path(tmp) / "out")]
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"raft.py failed:\n{done.stderr[-2000:]}")
        sent = int(done.stdout.split("requests", 1)[1].split("sent", 1)[0])
    limit = sent * delay / in_flight
    return seconds, sent, limit


def end_to_end_table(delay: float, chunks: int):
    print(f"\n== End to end: raft.py -t 4 on {chunks} chunks (327K characters), loopback server answering every "
          f"request after {delay * 1000:.0f} ms")
    print(f"{'max_in_flight':>13} {'seconds':>8} {'requests':>9} {'limit s':>8} {'of limit':>9} {'req/s':>7}")
    for in_flight in (32, 64):
        seconds, sent, limit = end_to_end(delay, chunks, in_flight)
        print(f"{in_flight:>13} {seconds:8.2f} {sent:>9} {limit:8.2f} {limit / seconds:9.2f} {sent / seconds:7.1f}")


def real_throughput(teacher_url: str, chunks: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "raft.py"), "-u", teacher_url, "-k", "EMPTY", "-t", "4",
               "--max_chunks", str(chunks), "-o", out]
        started = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        counts = json.loads(Path(out, "raft_run.json").read_text())["counts"]
        with sqlite3.connect(Path(out, "llm_cache.sqlite")) as db:
            requests, prompt, completion = db.execute(
                "SELECT COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM replies").fetchone()
    return {"seconds": seconds, "chunks_per_min": chunks / seconds * 60, "requests": requests,
            "generated_per_s": completion / seconds, "total_per_s": (prompt + completion) / seconds,
            "examples": counts["examples"]}


def with_teacher(server: str, chunks: int) -> dict:
    env = {**os.environ, "TEACHER_PORT": str(free_port()), "TEACHER_SERVER": server}
    subprocess.run([str(ROOT / "scripts/teacher.sh"), "start"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    try:
        return real_throughput(f"http://127.0.0.1:{env['TEACHER_PORT']}/v1", chunks)
    finally:
        subprocess.run([str(ROOT / "scripts/teacher.sh"), "stop"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def real_table(chunks: int, teacher_url: Optional[str]):
    print(f"\n== Real: raft.py -t 4 on the first {chunks} chunks of data/, SmolLM2-135M-Instruct Q4_1, this machine")
    print(f"{'server':44} {'seconds':>8} {'chunks/min':>11} {'requests':>9} {'gen. tok/s':>11} {'all tok/s':>10} "
          f"{'examples':>9}")
    if teacher_url:
        runs = {f"the server at {teacher_url}": real_throughput(teacher_url, chunks)}
    else:
        runs = {}
        if subprocess.run([str(ROOT / ".venv-teacher/bin/python"), "-c", "import llama_cpp"],
                          capture_output=True).returncode == 0:
            runs["llama-cpp-python server (one request at a time)"] = with_teacher("python", chunks)
        else:
            print("(llama-cpp-python's server is not installed: scripts/teacher.sh setup-python-server adds it)")
        runs["llama-server, 8 parallel slots (the default)"] = with_teacher("cpp", chunks)
    for name, r in runs.items():
        print(f"{name:44} {r['seconds']:8.1f} {r['chunks_per_min']:11.1f} {r['requests']:>9} "
              f"{r['generated_per_s']:11.1f} {r['total_per_s']:10.1f} {r['examples']:>9}")
    if len(runs) == 2:
        before, after = runs.values()
        print(f"llama-server vs the Python server: {after['total_per_s'] / before['total_per_s']:.2f}x tokens/s, "
              f"{after['chunks_per_min'] / before['chunks_per_min']:.2f}x chunks/min")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--delay", type=float, default=0.2, help="loopback server delay in seconds")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs at 8 and 64 in flight (median shown)")
    parser.add_argument("--corpus_chunks", type=int, default=383, help="chunks of the end-to-end workload")
    parser.add_argument("--chunks", type=int, default=20, help="chunks of data/ asked about in the real part")
    parser.add_argument("--skip-real", action="store_true", help="only the loopback parts")
    parser.add_argument("--teacher-url", help="a running teacher server; default: start scripts/teacher.sh")
    args = parser.parse_args()
    loopback(args.requests, args.delay, args.repeats)
    end_to_end_table(args.delay, args.corpus_chunks)
    if not args.skip_real:
        real_table(args.chunks, args.teacher_url)


if __name__ == "__main__":
    main()
