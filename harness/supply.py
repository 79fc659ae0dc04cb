"""A load point's prompts, built ahead of need and off the event loop: no send waits for a prompt.

Building a prompt asks the served model's tokenizer (often the engine's own `/tokenize`, over HTTP) several times;
done on the send path, it held the loop: a `--duration` point that ran out of its first prompts and built the next
ones in growing blocks sent the requests after each block 0.2-1.4 s late, and was judged INVALID for a send lag the
harness itself caused (issue 21). So `PromptSupply`:

- `prepare()` builds the first `first` requests before the point starts (the caller's thread: nothing is timed yet);
- `start()` starts a worker thread that keeps building while the point runs, so that at least `low_water` requests
  stay ready (at least as many as the point has taken so far, so the margin grows with the point's pace);
- iterating hands out ready requests (a `deque.popleft`, no lock); only when the worker fell behind does it wait,
  and each such wait is counted (`waits`, `waited_s`: the point_end event records them).

The worker holds the GIL only between its tokenizer calls; while it runs, the interpreter's switch interval is
0.5 ms rather than 5 ms, so a read callback that wants to send never waits longer than that for it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from workloads.spec import RequestSpec

__all__ = ["PromptSupply"]

SWITCH_INTERVAL_S = 0.0005
MAX_AHEAD = 4096


class PromptSupply:
    """The requests of `make()` (an iterator, possibly endless), built ahead of need by a worker thread."""

    def __init__(
        self, make: Callable[[], Iterator[RequestSpec]], first: int, low_water: int | None = None
    ) -> None:
        self._make = make
        self.first = max(1, first)
        self.low_water = max(1, low_water if low_water is not None else self.first)
        self._ready: deque[RequestSpec] = deque()
        self._cond = threading.Condition()
        self._source: Iterator[RequestSpec] | None = None
        self._exhausted = False
        self._error: BaseException | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._switch: float | None = None
        self.handed = 0
        self.built_ahead = 0  # built before the point started
        self.built_during_point = 0  # built by the worker while the point ran
        self.waits = 0  # times a send had to wait for the worker
        self.waited_s = 0.0

    # -- before the point ------------------------------------------------------------------------------------------
    def prepare(self) -> PromptSupply:
        self._source = self._make()
        for _ in range(self.first):
            spec = next(self._source, None)
            if spec is None:
                self._exhausted = True
                break
            self._ready.append(spec)
        self.built_ahead = len(self._ready)
        return self

    def start(self) -> None:
        if self._source is None:
            self.prepare()
        if self._exhausted or self._thread is not None:
            return
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self._work, name="prompt-supply", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            # it ends after the tokenizer call it may be in; a hung tokenizer must not hold the point's end (the
            # thread is a daemon and touches nothing of the point)
            self._thread.join(timeout=2.0)
            self._thread = None
        if self._switch is not None:
            sys.setswitchinterval(self._switch)
            self._switch = None

    def __enter__(self) -> PromptSupply:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the worker ------------------------------------------------------------------------------------------------
    def _target(self) -> int:
        return min(MAX_AHEAD, max(self.low_water, self.handed))

    def _work(self) -> None:
        assert self._source is not None
        while True:
            with self._cond:
                while not self._stopping and len(self._ready) >= self._target():
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                spec = next(self._source, None)
            except BaseException as e:  # handed to the point's thread, which raises it
                spec, self._error = None, e
            with self._cond:
                if spec is None:
                    self._exhausted = True
                else:
                    self._ready.append(spec)
                    self.built_during_point += 1
                self._cond.notify_all()
            if spec is None:
                return

    # -- during the point ------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[RequestSpec]:
        return self

    def __next__(self) -> RequestSpec:
        try:
            spec = self._ready.popleft()
        except IndexError:
            spec = self._wait() if self._thread is not None else self._build_here()
        self.handed += 1
        if self._thread is not None and len(self._ready) < self._target():
            with self._cond:
                self._cond.notify_all()
        return spec

    def _build_here(self) -> RequestSpec:
        """Not started (no worker): build on the caller's thread, as a plain iterator would."""
        if self._source is None:
            self.prepare()
            if self._ready:
                return self._ready.popleft()
        assert self._source is not None
        spec = next(self._source, None) if not self._exhausted else None
        if spec is None:
            self._exhausted = True
            raise StopIteration
        return spec

    def _wait(self) -> RequestSpec:
        started = time.perf_counter()
        with self._cond:
            counted = False
            while not self._ready:
                if self._error is not None:
                    raise self._error
                if self._exhausted:
                    raise StopIteration
                if not counted:
                    self.waits, counted = self.waits + 1, True
                self._cond.notify_all()
                self._cond.wait()
            spec = self._ready.popleft()
        self.waited_s += time.perf_counter() - started
        return spec

    def stats(self) -> dict[str, float | int]:
        """For the point_end event: how many were built ahead and during the point, and how sends waited."""
        return {
            "specs_built_ahead": self.built_ahead,
            "specs_built_during_point": self.built_during_point,
            "specs_waits": self.waits,
            "specs_waited_s": round(self.waited_s, 6),
        }
