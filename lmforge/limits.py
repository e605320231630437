"""Process limits raised at start-up."""

from __future__ import annotations

MACOS_OPEN_MAX = 10240  # macOS reports an unlimited hard limit but refuses a soft limit above this


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one; returns (old soft, new soft). Never raises.

    Many clusters start jobs with a soft ``ulimit -n`` of 1024 while the hard limit is far higher.
    The loader keeps only a bounded number of shard files open, but DeepSpeed's checkpoint writers,
    the process group's sockets and the launcher's pipes come on top, and a process may raise its
    own soft limit up to the hard one without any privilege. (-1, -1) when the platform has no
    such limit; (old, old) when the kernel refuses the change.
    """
    try:
        import resource  # Unix only
    except ImportError:
        return -1, -1
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return -1, -1
    target = MACOS_OPEN_MAX if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft, soft
    return soft, target
