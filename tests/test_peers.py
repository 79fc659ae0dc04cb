"""benchmarks.peers charges a client the CPU it used while the server served its requests, taken afterwards from the
server's own account, and stays out of the way of what it measures (nothing polls the server meanwhile)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks.peers import _measured
from harness.calibration import ScriptConfig, fetch_stats, reset_stats, serve_in_process

# A client that burns 0.4 s of CPU before and after sending `n` streamed requests one after another
CLIENT = r"""
import json, sys, time, urllib.request

def burn(s):
    end = time.process_time() + s
    while time.process_time() < end:
        pass

url, n = sys.argv[1], int(sys.argv[2])
burn(0.4)
for i in range(n):
    body = {"model": "scripted", "request_id": f"t{i}", "stream": True, "max_tokens": 20,
            "messages": [{"role": "user", "content": "hi"}]}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        r.read()
burn(0.4)
"""


def test_measured_charges_only_the_window_the_server_served(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    cfg = ScriptConfig(ttft=0.05, itl=0.005, output_tokens=20)
    with serve_in_process(cfg) as url:
        reset_stats(url)
        m = _measured([sys.executable, str(script), url, "6"], url, 6)
        assert m.code == 0, m.tail
        # nothing asked the server for anything while the client ran: its account holds the six requests only
        assert fetch_stats(url, brief=True)["requests"] == 6
        # the account is the one handed back
        assert sorted(m.stats["per_request"]) == [f"t{i}" for i in range(6)]
        reset_stats(url)
        with pytest.raises(RuntimeError, match="accounted 6 streams, 7 expected"):
            _measured([sys.executable, str(script), url, "6"], url, 7)
    # the truth: from the second request's arrival to the sixth's last write, five answers of 50 + 19 x 5 = 145 ms
    # one after another (725 ms), plus the client's own gaps between them and the server's lags: a few ms each
    assert 0.72 <= m.wall_s <= 0.85, m.wall_s
    # the 0.8 s burnt before and after is outside the window; inside, the client mostly waits on its socket
    assert m.cpu_total_s >= 0.8, m.cpu_total_s
    assert m.cpu_s < 0.25, m.cpu_s
