"""Live progress for long work: rich progress bars on a terminal, occasional plain lines elsewhere (CI logs).

`LiveProgress` is the `progress` callable of `harness.orchestrate.execute` and of `adapters.install.install`: plain
strings are log lines; `harness.progress` events update one bar each (a load point: requests done of total, rate,
time left; an engine starting: seconds so far and its latest log line; an install step: N of M). Without a terminal
an event becomes a plain line at most every `plain_every_s` seconds per bar (and when it finishes), so a CI log
shows how far the work is without a line per request.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from harness.progress import EngineWaiting, InstallProgress, PointProgress, ProgressEvent

__all__ = ["LiveProgress"]


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = round(seconds)
    return f"{s // 60}:{s % 60:02d}"


class LiveProgress:
    """A progress callable that draws `harness.progress` events (see the module docstring)."""

    def __init__(self, console: Console, *, plain_every_s: float = 15.0, live: bool | None = None) -> None:
        self.console = console
        self.live = console.is_terminal if live is None else live
        self.plain_every_s = plain_every_s
        self._lock = threading.Lock()
        self._tasks: dict[tuple[str, str], TaskID] = {}
        self._printed: dict[tuple[str, str], float] = {}
        self._progress: Progress | None = None

    def __enter__(self) -> LiveProgress:
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=self.console,
                refresh_per_second=2,  # the client shares the CPU with the engines: draw seldom
                transient=False,
            )
            self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -- the callable ------------------------------------------------------------------------------------------
    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            if isinstance(event, PointProgress):
                self._point(event)
            elif isinstance(event, EngineWaiting):
                self._waiting(event)
            elif isinstance(event, InstallProgress):
                self._install(event)
            else:
                self._log(str(event))

    def _log(self, line: str) -> None:
        console = self._progress.console if self._progress is not None else self.console
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {escape(line)}", highlight=False, soft_wrap=True)

    def _bar(self, key: tuple[str, str], description: str, completed: float, total: float | None, info: str,
             finished: bool = False, plain: str = "") -> None:  # fmt: skip
        if self._progress is not None:
            task = self._tasks.get(key)
            if task is None:
                task = self._tasks[key] = self._progress.add_task(description, total=total, info=info)
            self._progress.update(task, description=description, completed=completed, total=total, info=info)
            if finished:
                self._progress.stop_task(task)
            return
        now = time.monotonic()
        last = self._printed.get(key)
        if finished or last is None or now - last >= self.plain_every_s:
            self._printed[key] = now
            self._log(plain or f"{description} {info}")

    def _skip(self, key: tuple[str, str], finished: bool) -> bool:
        """Off a terminal, an event that would print no line is dropped before any text is built (one per request)."""
        if self._progress is not None or finished:
            return False
        last = self._printed.get(key)
        return last is not None and time.monotonic() - last < self.plain_every_s

    def _point(self, e: PointProgress) -> None:
        if self._skip(("point", f"{e.engine} {e.point}"), e.finished):
            return
        rate = e.done / e.elapsed_s if e.elapsed_s > 0 else None
        counts = f"{e.ok} ok" + (f", {e.failed} failed" if e.failed else "")
        counts += f", {e.cancelled} cancelled" if e.cancelled else ""
        left = "done" if e.finished else f"{_clock(e.left_s)} left"
        total: float | None
        if e.total is not None:
            completed, total = float(e.done), float(e.total)
            done_text = f"{e.done}/{e.total} requests"
        else:  # a --duration point: the bar is the window
            completed = min(e.elapsed_s, e.window_s or e.elapsed_s)
            total = e.window_s
            done_text = f"{e.done} requests, window {_clock(e.window_s)}"
        info = f"{done_text} ({counts}), {rate:.1f} req/s, {left}" if rate else f"{done_text}, {left}"
        self._bar(("point", f"{e.engine} {e.point}"), f"{escape(e.engine)} {escape(e.point)}", completed, total,
                  escape(info), e.finished, str(e))  # fmt: skip

    def _waiting(self, e: EngineWaiting) -> None:
        line = e.last_line if len(e.last_line) <= 60 else e.last_line[:57] + "..."
        info = f"starting, {e.waited_s:.0f} s" + (f": {line}" if line else "")
        self._bar(("ready", e.engine), f"{escape(e.engine)} starting", e.waited_s, e.timeout_s, escape(info),
                  plain=str(e))  # fmt: skip

    def _install(self, e: InstallProgress) -> None:
        if e.unit == "bytes":
            amount = f"{e.done / 2**20:.0f}" + (f"/{e.total / 2**20:.0f}" if e.total else "") + " MiB"
        else:
            amount = f"{e.done:.0f}" + (f"/{e.total:.0f}" if e.total else "") + f" {e.unit}"
        detail = e.detail if len(e.detail) <= 50 else "..." + e.detail[-47:]
        finished = e.total is not None and e.done >= e.total
        self._bar(("install", f"{e.component} {e.step}"), f"{escape(e.component)} {escape(e.step)}", e.done,
                  e.total, escape(f"{amount} {detail}".strip()), finished, str(e))  # fmt: skip
