"""The server replicas of one model (-u given several times): round-robin over those in rotation, and a replica that
refuses connections or keeps failing taken out for a while, then tried again.

A replica is taken out at once when it refuses a connection (nothing listens there: a killed or restarting server),
and after FAILURES_IN_A_ROW failed attempts in a row otherwise (timeouts, 5xx). It comes back after a back-off that
doubles with each time it is taken out again without a success in between (BACKOFF, up to BACKOFF_MAX); its first
attempt back decides: a success puts it back for good, a failure takes it out again. Used by llm_client.ChatClient.
"""
import time
from dataclasses import dataclass
from typing import Optional

FAILURES_IN_A_ROW = 3
BACKOFF, BACKOFF_MAX = 2.0, 60.0


@dataclass
class Replica:
    url: str
    name: str                            # the URL as it may be printed: no credentials, path or query
    failures: int = 0                    # failed attempts since its last success
    comes_back: float = 0.0              # monotonic time it is tried again; 0: in rotation
    times_out: int = 0                   # times it was taken out, in all
    streak: int = 0                      # times taken out since its last success: the back-off's exponent
    out_since: Optional[float] = None    # when its current time out of rotation began
    out_seconds: float = 0.0             # finished times out of rotation, in all

    def in_rotation(self, now: float) -> bool:
        return self.comes_back <= now


class Replicas:
    def __init__(self, urls: list[str], names: list[str], clock=time.monotonic):
        self.all = [Replica(url, name) for url, name in zip(urls, names)]
        self.clock = clock
        self.turn = 0

    def pick(self) -> tuple[Optional[Replica], float]:
        """(the next replica in rotation, 0), or (None, seconds until the first one comes back) when all are out."""
        now = self.clock()
        for _ in range(len(self.all)):
            replica = self.all[self.turn % len(self.all)]
            self.turn += 1
            if replica.in_rotation(now):
                return replica, 0.0
        return None, min(r.comes_back for r in self.all) - now

    def others_in_rotation(self, replica: Replica) -> bool:
        now = self.clock()
        return any(r is not replica and r.in_rotation(now) for r in self.all)

    def succeeded(self, replica: Replica):
        if replica.out_since is not None:
            replica.out_seconds += self.clock() - replica.out_since
            replica.out_since = None
        replica.failures = replica.streak = 0

    def failed(self, replica: Replica, refused: bool) -> bool:
        """Count a failed attempt; True when it took the replica out of rotation."""
        replica.failures += 1
        back_on_trial = replica.out_since is not None
        if not (refused or back_on_trial or replica.failures >= FAILURES_IN_A_ROW):
            return False
        self.take_out(replica)
        return True

    def take_out(self, replica: Replica):
        now = self.clock()
        replica.comes_back = now + min(BACKOFF_MAX, BACKOFF * 2 ** replica.streak)
        replica.streak += 1
        replica.times_out += 1
        if replica.out_since is None:
            replica.out_since = now

    def outages(self) -> list[str]:
        """One line per replica that was out of rotation: how often and for how long in all."""
        now = self.clock()
        lines = []
        for r in self.all:
            if r.times_out:
                seconds = r.out_seconds + (now - r.out_since if r.out_since is not None else 0.0)
                still = ", still out at the end" if r.out_since is not None else ""
                lines.append(f"{r.name}: out of rotation {r.times_out} time(s), {seconds:.0f} s in all{still}")
        return lines
