"""The client's event loop (harness.loop): chosen by ENGINEBENCH_LOOP, uvloop by default where installed, recorded in
the manifest, and a bad value is one clear error."""

from __future__ import annotations

import asyncio

import pytest

from harness import loop
from harness.errors import ConfigError
from harness.rundir import host_info


async def _loop_type() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize(("value", "module"), [("asyncio", "asyncio"), ("uvloop", "uvloop"), ("", "uvloop")])
def test_the_chosen_loop_runs_and_is_recorded(
    monkeypatch: pytest.MonkeyPatch, value: str, module: str
) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.setenv(loop.ENV, value)
    assert loop.run(_loop_type()).split(".")[0] == module
    assert (host_info().event_loop or "").split(" ")[0] == module


def test_a_bad_choice_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loop.ENV, "tokio")
    coro = _loop_type()
    with pytest.raises(
        ConfigError, match="ENGINEBENCH_LOOP='tokio' is not an event loop; use uvloop or asyncio"
    ):
        loop.run(coro)
    assert coro.cr_frame is None  # closed, not left un-awaited


@pytest.mark.parametrize(("value", "tick_s"), [("", 0.0005), ("0", 0.0), ("1.5", 0.0015)])
def test_the_read_tick_is_set_and_recorded(
    monkeypatch: pytest.MonkeyPatch, value: str, tick_s: float
) -> None:
    monkeypatch.setenv(loop.READ_TICK_ENV, value)
    assert loop.read_tick_s() == pytest.approx(tick_s)
    described = host_info().event_loop or ""
    assert ("plain-HTTP reads at most every" in described) == (tick_s > 0), described
    if tick_s:
        assert described.endswith(f"every {tick_s * 1000:g} ms)"), described


@pytest.mark.parametrize("value", ["fast", "-1", "6"])
def test_a_bad_read_tick_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(loop.READ_TICK_ENV, value)
    with pytest.raises(ConfigError, match=f"ENGINEBENCH_READ_TICK_MS='{value}' is not a tick of 0-5 ms"):
        host_info()
