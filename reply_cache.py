"""The reply cache of every LLM call: finished replies in an SQLite file, keyed by the request and the model.

raft.py and raft_eval.py resume from it after a crash, Ctrl-C or kill -9: a re-run sends only the requests that
never completed. Used through llm_client.ChatClient (cache_path).

Keys carry the model's fingerprint (what its server says about the weights behind the name), so another model
served under the same name is asked again. raft.py's caches of versions before 0.2 have keys without one: such a
cache is adopted by the first model fingerprint that opens it (the re-run of the same command, in practice), whose
requests then also find the old keys; any other model never does.
"""
import errno
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Optional, Sequence

from errors import OutputError

KEYS_WITH_FINGERPRINT = "2"      # the meta table's key_version of a cache whose every key has the model's fingerprint


def cache_key(model: str, messages: Sequence[dict], params: dict, fingerprint: str = "") -> str:
    """The reply cache's key. `fingerprint` stands for what the server says about the model behind the name (see
    ChatClient.model_description): a different model served under the same name gets other keys."""
    blob = json.dumps({"model": model, "messages": list(messages), "params": params,
                       **({"fingerprint": fingerprint} if fingerprint else {})}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Finished replies in an SQLite file (WAL mode), one row per request key, so that neither a run's memory nor
    the time to open a cache grows with it (a million replies open in milliseconds; a lookup is one indexed read).
    Each reply is committed as it arrives: a run killed with kill -9 loses only the requests in flight.

    A path ending in .jsonl names an earlier version's append-only JSON-lines cache: the database is the same
    path with .sqlite, and the JSON lines are imported into it on first use (a torn last line is skipped)."""

    def __init__(self, path: str):
        given = Path(path)
        self.path = given.with_suffix(".sqlite") if given.suffix == ".jsonl" else given
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.torn_lines = 0
        with self.writing():
            # isolation_level=None: autocommit, every put is its own transaction. synchronous=NORMAL in WAL mode
            # keeps committed rows through a process crash (not through a power cut, which would cost a few replies).
            self.db = sqlite3.connect(self.path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            fresh = not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'replies'").fetchone()
            self.db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
                            "prompt_tokens INTEGER, completion_tokens INTEGER, truncated INTEGER)")
            self.db.execute("CREATE TABLE IF NOT EXISTS imported (file TEXT PRIMARY KEY)")
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            if fresh:
                self._set("key_version", KEYS_WITH_FINGERPRINT)
            legacy = given.with_suffix(".jsonl")
            if legacy.exists():
                self._import(legacy)

    def writing(self):
        """A context in which a failed write (a full disk, a read-only folder) is an OutputError that says what to
        do; what the cache holds stays readable (every write is one SQLite transaction)."""
        return _Writing(self.path)

    def _meta(self, name: str) -> Optional[str]:
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def _set(self, name: str, value: str):
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def adopts_unfingerprinted(self, fingerprint: str) -> bool:
        """Whether keys without a fingerprint (a cache of an earlier version) may answer the model of `fingerprint`:
        yes for the first model fingerprint that asks, which then owns them; never for another one."""
        if not fingerprint or self._meta("key_version") == KEYS_WITH_FINGERPRINT:
            return False
        owner = self._meta("unfingerprinted_keys_owner")
        if owner is None:
            with self.writing():
                self._set("unfingerprinted_keys_owner", fingerprint)
            return True
        return owner == fingerprint

    def _import(self, legacy: Path):
        if self.db.execute("SELECT 1 FROM imported WHERE file = ?", (str(legacy.resolve()),)).fetchone():
            return
        rows = []
        with open(legacy, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                    rows.append((r["key"], r["text"], r["prompt_tokens"], r["completion_tokens"],
                                 int(bool(r.get("truncated")))))
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.torn_lines += 1
        with self.db:      # one transaction: all of the file or nothing
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO replies VALUES (?, ?, ?, ?, ?)", rows)
            self.db.execute("INSERT INTO imported VALUES (?)", (str(legacy.resolve()),))

    def get(self, key: str) -> Optional[dict]:
        row = self.db.execute("SELECT text, prompt_tokens, completion_tokens, truncated FROM replies WHERE key = ?",
                              (key,)).fetchone()
        if row is None:
            return None
        return {"key": key, "text": row[0], "prompt_tokens": row[1], "completion_tokens": row[2],
                "truncated": bool(row[3])}

    def put(self, key: str, text: str, prompt_tokens: int, completion_tokens: int, truncated: bool = False):
        with self.writing():
            self.db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?)",
                            (key, text, prompt_tokens, completion_tokens, int(truncated)))

    def keys(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT key FROM replies")}

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self):
        self.db.close()


class _Writing:
    """See ResponseCache.writing."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, sqlite3.OperationalError):
            message = str(error)
            full = "full" in message or getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            advice = ("free space there (or move the cache with --cache_path); the replies it holds are kept, and the "
                      "same command resumes from them" if full else "make its folder writable or move it with "
                      "--cache_path")
            raise OutputError(f"the reply cache {self.path} could not be written ({message}): {advice}") from None
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"the reply cache {self.path} could not be written ({error.strerror}): free space "
                              "there; the same command resumes from what it holds") from None
        return False
