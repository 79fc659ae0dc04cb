"""Operating-system limits a run needs: open files (RLIMIT_NOFILE) for thousands of concurrent streams.

Every concurrent stream holds one socket; the process also holds its run files, the event loop's epoll, pipes and
libraries. At the start of `bench run` the soft limit is raised (up to the hard limit, which a process may do
without privileges) to what the run needs; when even the hard limit is too low the run refuses to start with one
line saying what to raise, rather than failing thousands of requests with "Too many open files" halfway through.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from harness.errors import ConfigError

__all__ = ["FILES_MARGIN", "FileLimit", "ensure_open_files", "files_needed", "open_files_limit"]

# sockets are one per stream; this covers the rest (run files, epoll, stdio, libraries, the telemetry samplers)
FILES_MARGIN = 100


@dataclass(frozen=True)
class FileLimit:
    """The open-files limits before and after `ensure_open_files`."""

    needed: int
    soft_before: int
    soft: int
    hard: int

    @property
    def raised(self) -> bool:
        return self.soft > self.soft_before


def _as_int(value: int) -> int:
    # RLIM_INFINITY is -1 on Linux: treat it as "no limit"
    return 1 << 62 if value == resource.RLIM_INFINITY else int(value)


def open_files_limit() -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of this process; unlimited reads as a very large number."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _as_int(soft), _as_int(hard)


def files_needed(concurrency: int) -> int:
    """Open files a client with `concurrency` streams in flight needs (one socket each, plus a margin)."""
    return max(0, int(concurrency)) + FILES_MARGIN


def ensure_open_files(concurrency: int) -> FileLimit:
    """Raise the soft open-files limit so `concurrency` streams fit; ConfigError when the hard limit is too low.

    The soft limit only goes up (never lowered), and never above what is needed unless it already was."""
    needed = files_needed(concurrency)
    soft, hard = open_files_limit()
    if needed <= soft:
        return FileLimit(needed, soft, soft, hard)
    if needed > hard:
        suggestion = max(20000, -(-needed * 3 // 2000) * 1000)
        raise ConfigError(
            f"concurrency {concurrency} needs ~{needed} open files; the OS allows {hard}: "
            f"raise it with `ulimit -n {suggestion}`"
        )
    new_hard = resource.RLIM_INFINITY if hard == 1 << 62 else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, new_hard))
    except (ValueError, OSError) as e:
        raise ConfigError(
            f"concurrency {concurrency} needs ~{needed} open files and raising the limit failed ({e}); "
            f"raise it with `ulimit -n {max(20000, -(-needed * 3 // 2000) * 1000)}`"
        ) from None
    return FileLimit(needed, soft, needed, hard)
