"""Suite-wide hooks: the time each test file took, so a slow machine (or a slow file) shows at the end of a run."""

from __future__ import annotations

from collections import defaultdict

import pytest

_FILE_SECONDS: defaultdict[str, float] = defaultdict(float)
SLOWEST_SHOWN = 10


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # setup + call + teardown: a module's fixtures (an engine launched once for the file) count to that file
    _FILE_SECONDS[report.nodeid.split("::", 1)[0]] += report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FILE_SECONDS:
        return
    total = sum(_FILE_SECONDS.values())
    terminalreporter.section(f"slowest {SLOWEST_SHOWN} test files (of {total / 60:.1f} min in tests)")
    ranked = sorted(_FILE_SECONDS.items(), key=lambda kv: kv[1], reverse=True)[:SLOWEST_SHOWN]
    for path, seconds in ranked:
        terminalreporter.write_line(f"{seconds:8.1f} s  {path}")
