"""Load on the RAG endpoint (chat.py --serve): N concurrent clients for a fixed time. Prints numbers; asserts
nothing.

  .venv/bin/python bench/serve_load.py                          # 64 clients, 60 s, the scripted model
  .venv/bin/python bench/serve_load.py --llama --clients 8      # the real SmolLM2 on llama.cpp (scripts/teacher.sh)

Each client asks one question after another (the questions of eval_llama.json, in turn) and records the status
and the time each request took. Printed per run: requests/s, p50/p95/p99 latency of the answered ones, the
status counts, the longest a request took to be turned away (429) against queue_wait, and the server process's
resident memory before and after (after a warm-up of one request). The server runs with the config's serving
limits (concurrency, queue_size, queue_wait); the scripted model streams its answer in 0.2 s.

Also, in the same process, the query rewriter's cost per unknown word on a 60K-word vocabulary: its trigram
shortlist against difflib over every word of about the same length (the way it was before), and the ratio.
"""
import argparse
import asyncio
import contextlib
import difflib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import EVAL_SCHEMA, load_config  # noqa: E402
from generation import free_port, wait_until_up  # noqa: E402
from retrieval import QueryRewriter  # noqa: E402
from tests.fake_server import FakeOpenAI, Reply  # noqa: E402

COT = "The guide says ##begin_quote## vLLM listens on port 8000 ##end_quote##.\n<ANSWER>: port 8000"


@contextlib.contextmanager
def rag_endpoint(model_url: str):
    """chat.py --serve over the model at model_url, on a free port: (its URL, its process)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), "-u", model_url, "--serve", "--port", str(port)],
                              cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1", seconds=180)
        yield f"http://127.0.0.1:{port}/v1", psutil.Process(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)


async def load(url: str, clients: int, seconds: float, questions: list[str]) -> list[tuple[int, float]]:
    """(status, seconds) of every request the clients sent in `seconds`."""
    results, stop_at = [], time.time() + seconds
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as http:
        async def client(number: int):
            turn = number
            while time.time() < stop_at:
                body = {"messages": [{"role": "user", "content": questions[turn % len(questions)]}]}
                started = time.time()
                try:
                    async with http.post(url + "/chat/completions", json=body) as response:
                        await response.read()
                        status = response.status
                except aiohttp.ClientError:
                    status = 0                     # the connection failed: counted apart
                results.append((status, time.time() - started))
                turn += clients
                if status == 429:
                    await asyncio.sleep(0.1)       # a polite client waits a little (Retry-After asks for more)
        await asyncio.gather(*(client(n) for n in range(clients)))
    return results


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def report(name: str, results: list[tuple[int, float]], seconds: float, before: int, after: int, queue_wait: float):
    answered = [t for status, t in results if status == 200]
    turned_away = [t for status, t in results if status == 429]
    counts = {status: sum(1 for s, _ in results if s == status) for status in sorted({s for s, _ in results})}
    print(f"{name}: {len(results)} requests in {seconds:.0f} s, {len(answered) / seconds:.1f} answered/s; "
          f"status counts {counts}")
    if answered:
        print(f"  answered: p50 {percentile(answered, 0.5):.2f} s, p95 {percentile(answered, 0.95):.2f} s, "
              f"p99 {percentile(answered, 0.99):.2f} s, longest {max(answered):.2f} s")
    if turned_away:
        print(f"  turned away (429): longest wait {max(turned_away):.2f} s (queue_wait {queue_wait:g} s), "
              f"median {statistics.median(turned_away):.3f} s")
    print(f"  server memory: {before / 2**20:.0f} MB before, {after / 2**20:.0f} MB after "
          f"({100 * (after - before) / before:+.1f}%)")


def run_load(name: str, model_url: str, args, cfg):
    questions = [item["question"] for item in json.loads((ROOT / "eval_llama.json").read_text())]
    with rag_endpoint(model_url) as (url, process):
        asyncio.run(load(url, 1, 0.01, questions))                # warm-up: the first answer loads what it needs
        before = process.memory_info().rss
        started = time.time()
        results = asyncio.run(load(url, args.clients, args.seconds, questions))
        elapsed = time.time() - started
        after = process.memory_info().rss
    report(name, results, elapsed, before, after, cfg["queue_wait"])


def rewriter_cost():
    rng = random.Random(0)
    syllables = ["ta", "ren", "qua", "ti", "za", "tion", "mo", "del", "ing", "er", "pro", "cess", "ver", "li", "ne"]
    words = set()
    while len(words) < 60_000:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 6))))
    rewriter = QueryRewriter([" ".join(sorted(words))])
    vocabulary = sorted(rewriter.known)
    typos = [w[:i] + rng.choice("bcdfgkmpsx") + w[i + 1:] for w in rng.sample(vocabulary, 60)
             for i in [rng.randrange(len(w))]]
    typos = [t for t in typos if t not in rewriter.known]
    started = time.perf_counter()
    fast = [rewriter.correct(t) for t in typos]
    shortlist = (time.perf_counter() - started) / len(typos)
    started = time.perf_counter()
    slow = [difflib.get_close_matches(t, [w for w in vocabulary if abs(len(w) - len(t)) <= 2], n=1, cutoff=0.85)
            for t in typos]
    exhaustive = (time.perf_counter() - started) / len(typos)
    same = sum(f == (s[0] if s else None) for f, s in zip(fast, slow))
    print(f"query rewriter, {len(vocabulary)} words: {1000 * shortlist:.1f} ms per unknown word with the shortlist, "
          f"{1000 * exhaustive:.1f} ms over every word of about its length ({exhaustive / shortlist:.0f}x); the "
          f"same correction for {same} of {len(typos)}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--llama", action="store_true", help="the real SmolLM2 on llama.cpp instead of the scripted model")
    args = p.parse_args()
    cfg = load_config(str(ROOT / "raft_eval_config.yaml"), EVAL_SCHEMA)
    print(f"serving limits: concurrency {cfg['concurrency']}, queue_size {cfg['queue_size']}, "
          f"queue_wait {cfg['queue_wait']:g} s; {args.clients} clients for {args.seconds:g} s")
    rewriter_cost()
    if not args.llama:
        with FakeOpenAI(models=("raft-student",)) as fake:
            fake.script = lambda body, n: Reply(content=COT, delay=0.2)
            run_load("scripted model", fake.url, args, cfg)
        return
    env = {**os.environ, "TEACHER_PORT": str(free_port()), "TEACHER_ALIAS": "raft-student"}
    subprocess.run([str(ROOT / "scripts/teacher.sh"), "start"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    try:
        run_load("SmolLM2-135M on llama.cpp", f"http://127.0.0.1:{env['TEACHER_PORT']}/v1", args, cfg)
    finally:
        subprocess.run([str(ROOT / "scripts/teacher.sh"), "stop"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
