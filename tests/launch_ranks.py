"""``python tests/launch_ranks.py N PORT -m MODULE ARGS...``: start N ranks of ``python -m MODULE`` on this
host the way a static launcher does (srun with one task per rank, or ``torchrun --standalone``'s workers):
each gets RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT and shares this
process's stdout and stderr. When one rank fails, the others are killed and this exits 1, as torchrun
does; SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 are passed on to every rank.

Why not torchrun itself: its agent imports torch and sets up a rendezvous before any rank starts, ~2 s
per launch on a 2-core CPU; the suite launches multi-rank jobs ~50 times. The tests of torchrun's own
behaviour (a failing rank's root-cause report, the README's commands, the demo) still run torchrun:
``conftest.run_stage(..., launcher="torchrun")``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    n, port, cmd = int(argv[0]), argv[1], argv[2:]
    procs = []
    for rank in range(n):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                   GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, *cmd], env=env))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, forward)
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            rank, code = failed[0]
            print(f"launch_ranks: rank {rank} exited with {code}; the other ranks were killed", file=sys.stderr)
            return 1
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
