"""An output folder that survives a failed run: one run at a time (raft.py, quality.py and raft_eval.py hold a lock on
theirs while they run, so that two runs never write the same files or rename each other's), and new outputs written
beside the previous ones (STAGING) and swapped in only once all are written.

The lock is a POSIX record lock (lockf) on a file in the folder: the kernel releases it when its process ends,
however it ends (kill -9 included), so a lock is never left stale; unlike flock, a forked child (raft.py's record
writer) does not inherit it, so it is free the moment its run dies. The file says which process holds it (its pid
and script, never its arguments, which may hold an API key).
"""
import fcntl
import os
import sys
from pathlib import Path

import format as formats
from errors import OutputError

LOCK_FILE = ".raft-toolkit.lock"
STAGING = ".raft-next"     # inside the output folder: the new outputs, until all are written
LAST = "raft_run.json"     # the record of the run whose outputs are in place: moved in last


class FolderLock:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.file = None

    def __enter__(self):
        self.file = open(self.folder / LOCK_FILE, "a+", encoding="utf-8")
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise OutputError(f"{self.folder} is in use by another run ({holder}): wait for it to end, or choose "
                              "another output folder (-o)") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}, {Path(sys.argv[0]).name}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        self.file.close()          # closing the file releases the lock
        return False


def swap_in(staging: Path, output: Path):
    """Move the new outputs over the previous ones, file by file (each os.replace is atomic), raft_run.json last:
    until this point a failed or stopped run has left the previous outputs as they were. A replaced gigabyte file
    is freed on another thread (format.discard_in_background)."""
    for path in sorted(staging.iterdir(), key=lambda p: p.name == LAST):
        formats.discard_in_background(output / path.name)
        os.replace(path, output / path.name)
    staging.rmdir()
