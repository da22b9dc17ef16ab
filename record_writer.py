"""raft.py's record writer: a second process that assembles the teacher's questions and answers into RAFT records
and writes them (raft.jsonl's lines and the Hugging Face dataset), window after window, while raft.py drives the
teacher on the other core.
"""
import collections
import errno
import multiprocessing
import os
import queue
import signal
import sys
import traceback
from pathlib import Path
from typing import Optional

import orjson

import format as formats
from errors import OutputError
from raft_utils import QA, Assembler, AssemblySettings


STREAM = "raft_records.partial.jsonl"     # the records as they are written, in the staging folder
FILTERED = "filtered_out.jsonl"           # the records the quality stage dropped, each with its filter and value


def filtered_line(record: dict, verdict) -> bytes:
    """A line of filtered_out.jsonl: the record, the filter that dropped it and the value it dropped it for."""
    return orjson.dumps({**record, "filter": verdict.filter, "value": verdict.value}) + b"\n"


def convert_stream(staging: Path, cfg: dict) -> Path:
    """The converted file from the records streamed into the staging folder (raft.py's own format and JSONL: the
    stream itself, renamed)."""
    stream = staging / STREAM
    if cfg["output_format"] == "hf" and cfg["output_type"] == "jsonl":
        target = formats.output_file(str(staging / "raft"), "jsonl")
        os.replace(stream, target)
        return target
    target = formats.write(formats.iter_jsonl(str(stream)), str(staging / "raft"), cfg["output_format"],
                           cfg["output_type"], cfg["output_chat_system_prompt"])
    stream.unlink()
    return target


def write_records(chunks, settings, seed, stream: Path, folder: Path, windows, results):
    """The record writer process: assemble the QAs of each window into records and write them (raft.jsonl's
    lines and the Hugging Face dataset; the records of a question the quality stage dropped to filtered_out.jsonl);
    returns the counts, or the reason it failed, through `results`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)              # raft.py stops it (abandon); forked with Ctrl-C blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        import datasets  # noqa: F401 -- 0.7 s, needed to finish the dataset folder: taken while the teacher works
        assembler = Assembler(chunks, settings, seed)
        sink = formats.RecordSink(stream, folder)
        counts = collections.Counter(examples=0, **{"oracle-free": 0, "refusal": 0, "filtered records": 0})
        with open(folder / FILTERED, "wb") as filtered:
            while (qas := next_window(windows)) is not None:
                for qa, records in assembler.records_by_qa(qas):
                    for record in records:
                        if qa.dropped:
                            filtered.write(filtered_line(record, qa.dropped))
                            counts["filtered records"] += 1
                            continue
                        sink.add(record)
                        counts["examples"] += 1
                        counts["oracle-free"] += not record["oracle_present"] and record["id"].startswith("seed")
                        counts["refusal"] += record["id"].startswith("refusal")
        sink.close()
        results.put(counts)
    except OSError as e:
        results.put(f"writing the records into {folder} failed ({e}): {what_to_do_about(e)}")
    except BaseException:
        traceback.print_exc()
        results.put("the record writer failed (its traceback is above)")


def what_to_do_about(error: OSError) -> str:
    """The advice for a failed write, by its cause: space, permission, or neither."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space there or choose another -o"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable or choose another -o"
    return "choose another -o"


def next_window(windows) -> Optional[list[QA]]:
    """The next window's QAs, or None at the end; the writer exits if raft.py died without saying so (kill -9)."""
    parent = multiprocessing.parent_process()
    while True:
        try:
            return windows.get(timeout=1.0)
        except queue.Empty:
            if not parent.is_alive():
                sys.exit(1)


class RecordWriter:
    """Records are assembled and written in a second process while this one drives the teacher, so that the two
    halves of the work run on two cores (a re-run from the cache takes about half the time it would in one
    process). The process is forked with the chunks in its memory and is handed the QAs window by window; the
    queue holds one window, so memory stays bounded by the window."""

    def __init__(self, chunks, settings: AssemblySettings, seed: int, stream: Path, folder: Path):
        # fork: no copy of the chunks to send, no second start-up (spawn's re-import cost 0.3 s of the 8 s that
        # raft.py takes at 64 in flight on 383 chunks). The caller forks before it has threads or connections.
        context = multiprocessing.get_context("fork")
        self.windows, self.results = context.Queue(maxsize=1), context.Queue()
        self.process = context.Process(target=write_records, name="raft-record-writer", daemon=True,
                                       args=(chunks, settings, seed, stream, folder, self.windows, self.results))
        # Ctrl-C reaches every process of the terminal's group: the writer ignores it and is stopped by this
        # process instead. Blocked, not ignored, while forking: a Ctrl-C that comes meanwhile waits and is raised
        # here once the writer runs, instead of being lost (the run went on to the end).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def add(self, qas: list[QA]):
        """Hand over a window's QAs; waits while the writer is still busy with the previous window, and raises its
        failure as soon as it has stopped (a full disk), however many windows are left."""
        self._until_done(lambda: self.windows.put(qas, timeout=0.5))

    def finish(self) -> collections.Counter:
        """Wait for the last records to be written; returns the counts of examples written."""
        self.add(None)
        outcome = self._until_done(lambda: self.results.get(timeout=0.5))
        self.process.join()
        if isinstance(outcome, str):
            raise OutputError(outcome)
        return outcome

    def abandon(self):
        """After an interruption: stop the writer where it is (the dataset folder is left unfinished)."""
        self.process.terminate()
        self.process.join()

    def _until_done(self, step):
        """step() until it goes through; an OutputError with the writer's own reason once the writer has ended
        (it puts its reason, or its counts, in `results` and exits: it never takes another window)."""
        while True:
            try:
                return step()
            except (queue.Full, queue.Empty):
                if not self.process.is_alive():
                    raise OutputError(self._why_it_stopped()) from None

    def _why_it_stopped(self) -> str:
        try:
            outcome = self.results.get(timeout=1.0)
        except queue.Empty:
            return f"the record writer stopped (exit code {self.process.exitcode})"
        return outcome if isinstance(outcome, str) else "the record writer ended before the last window"
