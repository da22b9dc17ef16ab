"""How fast does generation talk to a server? Prints numbers; asserts nothing.

  .venv/bin/python bench/generation.py                 # loopback part + real llama.cpp part
  .venv/bin/python bench/generation.py --skip-real     # loopback part only

1. Loopback: a scripted OpenAI-compatible server (its own process) answers every request after a fixed delay
   with unlimited parallelism. N requests go through this project's client at 1, 8 and 64 in flight, and
   through LangChain's ChatOpenAI.batch called the way the reference raft_utils.py calls it (default settings).
   Each is printed against the limit N x delay / in-flight, and against the reference. Each way first sends
   one warm-up batch, so that connection set-up is not timed for either.
2. Real: raft.py on the first 20 chunks of data/ with the llama.cpp server and SmolLM2-135M-Instruct
   (started here unless --teacher-url is given): chunks per minute and generated tokens per second.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "bench" / "loopback_server.py"), str(port), str(delay)],
                              stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_up(url)
        rows = []
        for in_flight in (1, 8, 64):
            # One run at 1 in flight (it takes n x delay); the median of `repeats` for the short ones.
            seconds = time_project_client(url, n, in_flight, 1 if in_flight == 1 else repeats)
            rows.append((f"project client, {in_flight} in flight", in_flight, seconds))
        reference = time_reference(url, n)
    finally:
        server.terminate()
        server.wait()
    print(f"\n== Loopback: {n} requests, server delay {delay * 1000:.0f} ms, unlimited server parallelism "
          f"(8 and 64 in flight: median of {repeats} runs)")
    print(f"{'client':34} {'seconds':>8} {'limit s':>8} {'of limit':>9} {'req/s':>7} {'vs reference':>13}")
    for name, in_flight, seconds in rows:
        limit = n * delay / in_flight
        print(f"{name:34} {seconds:8.2f} {limit:8.2f} {limit / seconds:9.2f} {n / seconds:7.1f} {reference / seconds:12.1f}x")
    print(f"{'LangChain ChatOpenAI.batch (ref.)':34} {reference:8.2f} {'':>8} {'':>9} {n / reference:7.1f} {1.0:12.1f}x")


def real_throughput(teacher_url: str, chunks: int):
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "raft.py"), "-u", teacher_url, "-k", "EMPTY", "-t", "4",
               "--max_chunks", str(chunks), "-o", out]
        started = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        counts = json.loads(Path(out, "raft_run.json").read_text())["counts"]
        cache = [json.loads(line) for line in open(Path(out, "llm_cache.jsonl"))]
    completion = sum(r["completion_tokens"] for r in cache)
    prompt = sum(r["prompt_tokens"] for r in cache)
    print(f"\n== Real: raft.py -t 4 on {chunks} chunks of data/, llama.cpp server + SmolLM2-135M-Instruct Q4_1, this machine")
    print(f"wall time {seconds:.1f} s | {chunks / seconds * 60:.1f} chunks/min | {len(cache)} requests | "
          f"{completion / seconds:.1f} generated tokens/s | {(prompt + completion) / seconds:.1f} total tokens/s | "
          f"{counts['examples']} examples")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--delay", type=float, default=0.2, help="loopback server delay in seconds")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs at 8 and 64 in flight (median shown)")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--skip-real", action="store_true", help="only the loopback part")
    parser.add_argument("--teacher-url", help="a running teacher server; default: start scripts/teacher.sh")
    args = parser.parse_args()
    loopback(args.requests, args.delay, args.repeats)
    if args.skip_real:
        return
    if args.teacher_url:
        return real_throughput(args.teacher_url, args.chunks)
    env = {**os.environ, "TEACHER_PORT": str(free_port())}
    subprocess.run([str(ROOT / "scripts/teacher.sh"), "start"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    try:
        real_throughput(f"http://127.0.0.1:{env['TEACHER_PORT']}/v1", args.chunks)
    finally:
        subprocess.run([str(ROOT / "scripts/teacher.sh"), "stop"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
