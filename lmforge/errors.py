"""User-facing errors.

Library code raises :class:`LmforgeError` (or a subclass) with a message that names the file, key
or shard and says what to do. Each stage's CLI turns it into one line on stderr and exit code 2;
library code never calls ``sys.exit``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


class LmforgeError(Exception):
    """An error caused by the user's input (config, data, paths), not by a bug."""


class ConfigError(LmforgeError, ValueError):
    """A bad configuration key or value."""


class DataError(LmforgeError):
    """Bad or missing input data, shards or tokenizer files."""


class CheckpointError(LmforgeError):
    """A checkpoint that cannot or must not be resumed from."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; print an :class:`LmforgeError` as one line on stderr and return 2."""
    try:
        return int(main(argv) or 0)
    except LmforgeError as e:
        msg = " ".join(str(e).split("\n"))
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def exit_process(code: int) -> NoReturn:
    """End a training process with ``code`` without running C++ static destructors.

    A rank that used gloo sometimes aborts after its work is done ("terminate called without an
    active exception", SIGABRT: a joinable C++ thread destroyed at exit), and torchrun then reports
    the finished run as failed. Everything Python would still do is done first: other non-daemon
    threads are joined, ``atexit`` handlers run (logging, the run lock), stdout and stderr are flushed.
    """
    import atexit
    import os
    import threading

    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
