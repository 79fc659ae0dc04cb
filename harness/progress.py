"""Progress of long work, as data: a load point's requests, an engine's wait to become ready, an install step.

`harness.orchestrate` hands these (and plain message strings) to its `progress` callable; the CLI draws them as
live rich progress bars on a terminal and as occasional plain lines elsewhere (`harness.cli.live`). `str()` of each
is the plain line, so a consumer that only logs strings still reads sensibly. No clock is read here: whoever emits an
event stamps it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineWaiting", "InstallProgress", "PointProgress", "ProgressEvent"]


@dataclass(frozen=True, slots=True)
class PointProgress:
    """A load point after its `done`-th finished request (every phase counts: warm-up, measured, cool-down)."""

    engine: str
    point: str
    done: int
    total: (
        int | None
    )  # requests the point sends, when known (--requests); a --duration point has a window instead
    elapsed_s: float  # since the point started sending
    window_s: float | None = None  # the measurement window of a --duration point
    ok: int = 0
    failed: int = 0
    cancelled: int = 0
    finished: bool = False

    @property
    def left_s(self) -> float | None:
        """Time left, estimated from the pace so far (requests) or the window (duration)."""
        if self.finished:
            return 0.0
        if self.total is not None and self.done > 0 and self.elapsed_s > 0:
            return max(0.0, self.elapsed_s / self.done * (self.total - self.done))
        if self.window_s is not None:
            return max(0.0, self.window_s - self.elapsed_s)
        return None

    def __str__(self) -> str:
        of = f" of {self.total}" if self.total is not None else ""
        left = self.left_s
        eta = f", about {left:.0f} s left" if left is not None and not self.finished else ""
        counts = f" ({self.ok} ok, {self.failed} failed, {self.cancelled} cancelled)"
        return f"{self.engine} {self.point}: {self.done}{of} requests finished{counts} in {self.elapsed_s:.0f} s{eta}"


@dataclass(frozen=True, slots=True)
class EngineWaiting:
    """A launched engine not ready yet: how long so far, out of how long it may take, and its latest log line."""

    engine: str
    waited_s: float
    timeout_s: float
    last_line: str = ""

    def __str__(self) -> str:
        tail = f": {self.last_line}" if self.last_line else ""
        return f"{self.engine}: waiting to be ready, {self.waited_s:.0f} s so far{tail}"


@dataclass(frozen=True, slots=True)
class InstallProgress:
    """One install step's progress: `done` of `total` units (ninja's build steps, downloaded bytes, pip's packages)."""

    component: str
    step: str  # "build", "download", "pip"
    done: float
    total: float | None
    unit: str = ""  # "steps", "bytes", "packages"
    detail: str = ""  # e.g. the file being compiled or the package being installed

    def __str__(self) -> str:
        of = f"/{self.total:.0f}" if self.total is not None else ""
        detail = f" {self.detail}" if self.detail else ""
        return f"[{self.component}] {self.step} {self.done:.0f}{of} {self.unit}{detail}".rstrip()


ProgressEvent = str | PointProgress | EngineWaiting | InstallProgress
