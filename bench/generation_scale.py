"""raft.py at company scale: a synthetic corpus of 25K chunks (about 100K teacher requests) against the loopback
server answering at once. Prints numbers; asserts nothing.

  .venv/bin/python bench/generation_scale.py [--chunks 25000] [--window 2000]

Measured: requests per second of the cold run; the peak resident memory of raft.py and its record writer
process together when 10%, 50% and 100% of the requests are done (each process's peak read from /proc while it
runs, the peaks summed; 100% is over the whole run, output writing included); the time to open the full reply
cache and read one reply; and a warm re-run of the same command, which must send nothing. The targets: peak
memory at 100% within 1.2x of that at 10% (memory bounded by the window, not the corpus), and the warm re-run
under a quarter of the cold run.
"""
import argparse
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from generation import loopback_server, write_corpus  # noqa: E402
from reply_cache import ResponseCache  # noqa: E402

REQUESTS_PER_CHUNK = 5       # one question request, four answers (-t 4)


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident memory so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sample_peaks(pid: int, peaks: dict):
    """Update each process's peak of raft.py's tree (raft.py and its record writer): their sum bounds the
    tree's peak from above (pages a fork still shares count twice)."""
    try:
        members = [pid, *(child.pid for child in psutil.Process(pid).children())]
    except psutil.NoSuchProcess:     # raft.py has just ended
        return
    for member in members:
        try:
            # max: a process that has ended but is not yet reaped reports no memory at all; its last sample stands.
            peaks[member] = max(peaks.get(member, 0.0), peak_rss_mb(member))
        except OSError:        # it is gone
            pass


def replies_done(cache: Path) -> int:
    try:
        with sqlite3.connect(f"file:{cache}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    except sqlite3.Error:
        return 0


def run(cmd: list[str], cache: Path, expected: int) -> dict:
    """Run raft.py, sampling its peak memory as its cache fills."""
    started = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    marks, peaks = {}, {}
    while process.poll() is None:
        sample_peaks(process.pid, peaks)
        done = replies_done(cache)
        for share in (0.1, 0.5):
            if share not in marks and done >= share * expected:
                marks[share] = sum(peaks.values())
        time.sleep(0.2)
    marks[1.0] = sum(peaks.values())
    seconds = time.perf_counter() - started
    out = process.stdout.read()
    if process.returncode:
        raise SystemExit(f"raft.py failed ({process.returncode}):\n{out[-2000:]}")
    sent = int(out.split("requests", 1)[1].split("sent", 1)[0])
    return {"seconds": seconds, "sent": sent, "marks": marks, "summary": out}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=25_000)
    p.add_argument("--window", type=int, default=2000, help="--window_chunks of raft.py")
    p.add_argument("--in_flight", type=int, default=64)
    args = p.parse_args()
    with loopback_server(0) as url, tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus", args.chunks)
        out = Path(tmp) / "out"
        cmd = [sys.executable, str(ROOT / "raft.py"), "-u", url, "-t", "4", "--data_dir", str(corpus),
               "--max_in_flight", str(args.in_flight), "--window_chunks", str(args.window), "-o", str(out)]
        cache = out / "llm_cache.sqlite"
        expected = args.chunks * REQUESTS_PER_CHUNK
        cold = run(cmd, cache, expected)
        largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024    # the largest process's own peak
        opened = time.perf_counter()
        replies = ResponseCache(str(cache))
        some_key = next(iter(replies.db.execute("SELECT key FROM replies LIMIT 1")))[0]
        assert replies.get(some_key) is not None
        open_seconds = time.perf_counter() - opened
        count = len(replies)
        replies.close()
        warm = run(cmd, cache, expected)
        records = sum(1 for _ in open(out / "raft.jsonl"))

    print(f"== raft.py -t 4 on {args.chunks:,} chunks, {args.in_flight} in flight, windows of {args.window} chunks, "
          "loopback server answering at once")
    print(f"cold run      {cold['seconds']:8.1f} s   {cold['sent']:,} requests sent   "
          f"{cold['sent'] / cold['seconds']:,.0f} requests/s   {records:,} records")
    print(f"peak RSS      raft.py and its record writer together, at 10%: {cold['marks'].get(0.1, float('nan')):,.0f} MB"
          f"   at 50%: {cold['marks'].get(0.5, float('nan')):,.0f} MB   at 100% (writing included): "
          f"{cold['marks'][1.0]:,.0f} MB   100% / 10% = {cold['marks'][1.0] / cold['marks'].get(0.1, float('nan')):.2f}"
          f"   (the largest single process: {largest:,.0f} MB)")
    print(f"open cache    {open_seconds * 1000:8.1f} ms for {count:,} replies (open + one lookup)")
    print(f"warm re-run   {warm['seconds']:8.1f} s   {warm['sent']} requests sent   "
          f"{warm['seconds'] / cold['seconds']:.2f} of the cold run")


if __name__ == "__main__":
    main()
