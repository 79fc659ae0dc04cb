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
