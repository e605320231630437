"""One training process tree per run directory: a second one would interleave checkpoints.

The lock is ``flock`` on ``RUN_DIR/.lock`` where the filesystem has it: the kernel releases it
when the process dies, so it can never go stale. Lustre mounted without ``flock`` and NFS without
lockd raise ENOLCK / ENOSYS / EOPNOTSUPP instead; there the lock is a file created with O_EXCL,
``RUN_DIR/.lock.owner`` = {host, pid, heartbeat}, kept fresh by a thread and removed at exit. It is
stale (and taken over, said aloud) when its process is gone on this host, or its heartbeat is
older than ``STALE_S`` when it was written on another host (whose pids we cannot check).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import LmforgeError

NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
OWNER = ".lock.owner"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # 10 missed heartbeats: the owner's node is gone

_HELD: list = []  # open flock files live as long as the process (a crash releases them)


def lock_run_dir(run_dir: str | Path) -> str:
    """Take the run directory's lock or raise :class:`LmforgeError`; returns which lock is in use."""
    import fcntl

    run_dir = Path(run_dir)
    f = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise LmforgeError(f"another run is using {run_dir} (pid {holder}); wait for it or pick another --run_dir") from None
    except OSError as e:
        f.close()
        if e.errno not in NO_FLOCK:
            raise
        _take_owner_file(run_dir)
        return f"lock file {run_dir / OWNER} (flock is unsupported on this filesystem: {errno.errorcode[e.errno]})"
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    _HELD.append(f)
    return f"flock on {run_dir / '.lock'}"


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}


def _take_owner_file(run_dir: Path) -> None:
    path = run_dir / OWNER
    for _ in range(2):  # the second try follows the removal of a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            why = stale_reason(holder)
            if why is None:
                raise LmforgeError(
                    f"another run is using {run_dir} (lock file {path}: host {holder.get('host')}, pid "
                    f"{holder.get('pid')}); wait for it, pick another --run_dir, or delete {path} if that run is gone"
                ) from None
            print(f"taking over a stale run-directory lock {path} ({why})", flush=True)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(_me(), f)
        _keep_fresh(path)
        return
    raise LmforgeError(f"could not take the lock file {path}: another process took it at the same time")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # empty or torn: its writer died between create and write


def stale_reason(holder: dict, now: float | None = None, host: str | None = None) -> str | None:
    """Why the lock ``holder`` is stale, or None while its owner may still be running."""
    now = time.time() if now is None else now
    host = socket.gethostname() if host is None else host
    if not holder:
        return "unreadable owner record"
    if holder.get("host") == host:
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return f"pid {holder['pid']} is not running on {host}"
        except PermissionError:
            pass  # alive, another user's
        return None
    age = now - float(holder.get("heartbeat", 0))
    return f"no heartbeat from {holder.get('host')} for {age:.0f}s" if age > STALE_S else None


def _keep_fresh(path: Path) -> None:
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps(_me()))
                os.replace(tmp, path)
            except OSError:
                pass

    def release() -> None:
        stop.set()
        if _read(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)

    threading.Thread(target=beat, name="lmforge-run-dir-lock", daemon=True).start()
    atexit.register(release)


@contextlib.contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[None]:
    """``flock`` on ``path`` for the ``with`` block, or :class:`LmforgeError` naming ``what`` when another
    process holds it. Where the filesystem has no flock the block runs unlocked."""
    import fcntl

    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LmforgeError(f"another process is working on {what} ({path} is locked); wait for it to end") from None
        except OSError as e:
            if e.errno not in NO_FLOCK:
                raise
        yield
    finally:
        f.close()  # closing the file releases the lock
