"""Run claims: two sweeps of one study never train the same run.

Before a run trains, its process creates ``<study>/runs/.claim-<run_id>`` with
``O_CREAT | O_EXCL`` (exactly one process succeeds) holding host, PID, the PID's start time,
the start time of the claim and a random token. While the run trains a daemon thread refreshes
the file's mtime every `HEARTBEAT_S` seconds; the claim is removed once the run's folder is
written or the run failed (`Claim.release`).

A process that finds a claim skips the run (`idlab.sweep.execute.run_one` returns `CLAIMED`,
"claimed elsewhere": pending, not failed) unless the claim's owner is gone (`stale_reason`):

- same host: the PID is not alive (or now belongs to another process: its start time differs);
- another host (a shared file system): the heartbeat is older than `claim_timeout_s`
  (``$IDLAB_CLAIM_TIMEOUT_S``, default `CLAIM_TIMEOUT_S`);
- an unreadable claim (its writer died between create and write) older than `UNREADABLE_GRACE_S`.

A stale claim is taken over with one line naming its owner. Two processes taking over the
same stale claim at once are serialised by a second ``O_EXCL`` file (``.claim-<run_id>.takeover``):
the one that creates it removes the stale claim (if it is still the one it read) and claims
the run; the other treats the run as claimed elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: the status `run_one` returns for a run another live process holds
CLAIMED = "claimed"
CLAIM_PREFIX = ".claim-"
TAKEOVER_SUFFIX = ".takeover"
#: seconds between heartbeats (mtime refreshes) of a held claim
HEARTBEAT_S = 30.0
#: seconds without a heartbeat after which another host's claim counts as abandoned
CLAIM_TIMEOUT_S = 600.0
#: an unreadable (half-written) claim younger than this is live
UNREADABLE_GRACE_S = 60.0


def claim_timeout_s() -> float:
    """`CLAIM_TIMEOUT_S`, or ``$IDLAB_CLAIM_TIMEOUT_S`` when set."""
    raw = os.environ.get("IDLAB_CLAIM_TIMEOUT_S")
    try:
        return float(raw) if raw else CLAIM_TIMEOUT_S
    except ValueError:
        return CLAIM_TIMEOUT_S


def claim_path(runs_dir: str | Path, rid: str) -> Path:
    """The claim file of run ``rid``."""
    return Path(runs_dir) / f"{CLAIM_PREFIX}{rid}"


def is_claim_file(path: Path) -> bool:
    """Whether ``path`` is a claim file (not its takeover lock)."""
    return path.name.startswith(CLAIM_PREFIX) and not path.name.endswith(TAKEOVER_SUFFIX)


def hostname() -> str:
    """This host's name as claims record it."""
    return socket.gethostname()


def _pid_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class ClaimInfo:
    """What a claim file says about its owner, plus the file's heartbeat (mtime)."""

    run_id: str
    path: Path
    host: str | None = None
    pid: int | None = None
    pid_start: str | None = None
    started_at: str | None = None
    token: str | None = None
    mtime: float = 0.0

    def describe(self) -> str:
        """``host H pid P since T``."""
        if self.host is None:
            return f"an unreadable claim ({self.path.name})"
        return f"host {self.host} pid {self.pid} since {self.started_at}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON of the claim file."""
        return {"run_id": self.run_id, "host": self.host, "pid": self.pid, "pid_start": self.pid_start,
                "started_at": self.started_at, "token": self.token}


def read_claim(path: Path) -> ClaimInfo | None:
    """The claim at ``path``; None when there is none. A claim that does not parse has ``host`` None."""
    try:
        mtime = path.stat().st_mtime
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        text, mtime = "", time.time()
    rid = path.name[len(CLAIM_PREFIX):]
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        return ClaimInfo(run_id=str(raw.get("run_id") or rid), path=path, host=str(raw["host"]),
                         pid=int(raw["pid"]), pid_start=raw.get("pid_start"), started_at=raw.get("started_at"),
                         token=raw.get("token"), mtime=mtime)
    except (ValueError, KeyError, TypeError):
        return ClaimInfo(run_id=rid, path=path, mtime=mtime)


def stale_reason(info: ClaimInfo, now: float | None = None, timeout_s: float | None = None) -> str | None:
    """Why the owner of a claim is gone (see the module docstring), or None while it is live."""
    now = time.time() if now is None else now
    age = now - info.mtime
    if info.host is None or info.pid is None:
        return f"unreadable for {age:.0f}s" if age > UNREADABLE_GRACE_S else None
    if info.host == hostname():
        if not pid_alive(info.pid):
            return f"pid {info.pid} is not running on {info.host}"
        if info.pid_start is not None and _pid_start(info.pid) not in (None, info.pid_start):
            return f"pid {info.pid} on {info.host} is now another process"
        return None
    timeout = claim_timeout_s() if timeout_s is None else timeout_s
    if age > timeout:
        return f"no heartbeat from host {info.host} for {age:.0f}s (timeout {timeout:.0f}s)"
    return None


class Claim:
    """A claim this process holds: refreshed by a heartbeat thread, removed by `release`."""

    def __init__(self, info: ClaimInfo, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.info = info
        self.path = info.path
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if heartbeat_s > 0:
            self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                            name=f"idlab-claim-{info.run_id}")
            self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the claim file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        cur = read_claim(self.path)
        if cur is not None and cur.token == self.info.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _create(path: Path, rid: str) -> ClaimInfo | None:
    """Create the claim file with O_CREAT | O_EXCL; None when it exists."""
    pid = os.getpid()
    info = ClaimInfo(run_id=rid, path=path, host=hostname(), pid=pid, pid_start=_pid_start(pid),
                     started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     token=secrets.token_hex(8))
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    try:
        os.write(fd, (json.dumps(info.to_dict(), sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return dataclasses.replace(info, mtime=path.stat().st_mtime)


def _take_over(path: Path, stale: ClaimInfo) -> bool:
    """Remove the stale claim ``stale`` (only if it is still the one at ``path``), serialised by an
    O_EXCL takeover file. False when another process is taking it over."""
    lock = path.with_name(path.name + TAKEOVER_SUFFIX)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:  # a takeover file left by a process killed mid-takeover (it takes microseconds)
            if time.time() - lock.stat().st_mtime > UNREADABLE_GRACE_S:
                lock.unlink(missing_ok=True)
        except OSError:
            pass
        return False
    try:
        os.close(fd)
        cur = read_claim(path)
        if cur is None:
            return True
        if (cur.token, cur.host, cur.pid, cur.started_at) != (stale.token, stale.host, stale.pid, stale.started_at):
            return False  # someone else's claim by now
        path.unlink(missing_ok=True)
        return True
    finally:
        lock.unlink(missing_ok=True)


def acquire(runs_dir: str | Path, rid: str, say: Callable[[str], None] | None = None,
            heartbeat_s: float = HEARTBEAT_S, timeout_s: float | None = None) -> Claim | ClaimInfo:
    """Claim run ``rid``: a `Claim` when this process now holds it, else the live holder's `ClaimInfo`.

    A stale claim (`stale_reason`) is taken over with one line to ``say`` (default stderr).
    """
    out = say or (lambda line: print(line, file=sys.stderr, flush=True))
    path = claim_path(runs_dir, rid)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        info = _create(path, rid)
        if info is not None:
            return Claim(info, heartbeat_s)
        held = read_claim(path)
        if held is None:  # released meanwhile: try again
            continue
        why = stale_reason(held, timeout_s=timeout_s)
        if why is None:
            return held
        if not _take_over(path, held):
            return read_claim(path) or held
        out(f"taking over run {rid}: its claim by {held.describe()} is stale ({why})")
    held = read_claim(path)
    return held if held is not None else ClaimInfo(run_id=rid, path=path)


def iter_claims(runs_dir: str | Path) -> Iterator[ClaimInfo]:
    """Every claim file of a runs folder (live or stale), sorted by run id."""
    root = Path(runs_dir)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if is_claim_file(p):
            info = read_claim(p)
            if info is not None:
                yield info


def live_claim(runs_dir: str | Path, rid: str) -> ClaimInfo | None:
    """The claim on ``rid`` when its owner is alive, else None."""
    info = read_claim(claim_path(runs_dir, rid))
    return info if info is not None and stale_reason(info) is None else None


__all__ = ["CLAIMED", "CLAIM_TIMEOUT_S", "HEARTBEAT_S", "Claim", "ClaimInfo", "acquire", "claim_path",
           "claim_timeout_s", "is_claim_file", "iter_claims", "live_claim", "pid_alive", "read_claim",
           "stale_reason"]
