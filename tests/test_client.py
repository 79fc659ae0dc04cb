"""The streaming client against a scripted OpenAI-style server on loopback (real HTTP, known delays)."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import HttpCall, StreamDelta
from adapters.openai import build_openai, parse_openai_event, parse_openai_response
from harness.client import Target, _Framing, _StreamReader, make_session, send_request, timeouts_for
from harness.records import RequestRecord
from workloads.spec import RequestSpec

# TTFT/ITL tolerances on a shared 2-core machine: the server sleeps to absolute deadlines (asyncio rounds timers up to
# the millisecond), so a measured gap is never shorter than scripted and rarely more than a few ms longer.
TTFT_TOL_S = 0.025
ITL_MEAN_TOL_S = 0.002


class OpenAICodec:
    """A plain OpenAI-compatible codec (what adapters compose), module-level so it pickles for worker processes."""

    def build(self, spec: RequestSpec, model: str, stream: bool) -> HttpCall:
        return build_openai(spec, model, stream, pin_fields={"ignore_eos": True})

    def parse_event(self, data: bytes) -> StreamDelta | None:
        return parse_openai_event(data)

    def parse_response(self, body: bytes) -> StreamDelta:
        return parse_openai_response(body)


def script_spec(rid: str, **script: Any) -> RequestSpec:
    """A chat request whose last message tells the scripted server what to do."""
    return RequestSpec(
        request_id=rid,
        api="chat",
        max_tokens=int(script.get("n", 4)),
        messages=({"role": "user", "content": orjson.dumps(script).decode()},),
    )


def _chunk(content: str | None, finish: str | None = None, role: bool = False) -> bytes:
    delta: dict[str, Any] = {"content": content}
    if role:
        delta["role"] = "assistant"
    obj = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@dataclass
class ScriptedServer:
    """Scripts per request (from the last message): ttft, itl, n tokens, text, mode, per_chunk, usage, cached."""

    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0
    arrivals: list[float] = field(default_factory=list)
    peers: list[int] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t_in = time.perf_counter()
        self.arrivals.append(t_in)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.peers.append(peer[1] if peer else -1)
        body = await request.json()
        self.bodies.append(body)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return await self._respond(request, body, t_in)
        finally:
            self.inflight -= 1

    async def _respond(self, request: web.Request, body: dict[str, Any], t_in: float) -> web.StreamResponse:
        msgs = body.get("messages") or []
        s = orjson.loads(msgs[-1]["content"]) if msgs else {}
        mode = s.get("mode", "ok")
        n, ttft, itl = int(s.get("n", 4)), float(s.get("ttft", 0.0)), float(s.get("itl", 0.0))
        text = s.get("text", "tok ")
        if mode == "http500":
            return web.json_response({"error": {"message": "scripted failure"}}, status=500)
        if not body.get("stream"):
            await asyncio.sleep(ttft + itl * (n - 1))
            whole = {"prompt_tokens": 7, "completion_tokens": n}
            return web.json_response(
                {"choices": [{"message": {"content": text * n}, "finish_reason": "length"}], "usage": whole}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk("", role=True))
        per = int(s.get("per_chunk", 1))
        for i in range(0, n, per):
            await _sleep_until(t_in + ttft + itl * i)
            if mode == "stall" and i == 1:
                await asyncio.sleep(30)
            if mode == "drop" and i == 2:
                assert request.transport is not None
                request.transport.close()
                return resp
            if mode == "error_event" and i == 1:
                await resp.write(b'data: {"error": {"message": "scripted mid-stream error"}}\n\n')
                break
            last = i + per >= n and mode != "truncated"
            payload = b"".join(
                _chunk(text, "length" if last and j == per - 1 else None) for j in range(min(per, n - i))
            )
            if mode == "bytewise":
                for k in range(len(payload)):
                    await resp.write(payload[k : k + 1])
            else:
                await resp.write(payload)
        if mode not in ("truncated", "nodone"):
            if s.get("usage", True):
                usage: dict[str, Any] = {"prompt_tokens": 7, "completion_tokens": n}
                if "cached" in s:
                    usage["prompt_tokens_details"] = {"cached_tokens": s["cached"]}
                await resp.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            if mode == "open_after_done":
                await asyncio.sleep(30)
        await resp.write_eof()
        return resp


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    srv = ScriptedServer()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", srv.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    srv.url = f"http://127.0.0.1:{port}"
    try:
        yield srv
    finally:
        await runner.cleanup()


def target_for(url: str, **kw: Any) -> Target:
    return Target(engine="scripted", base_url=url, adapter=OpenAICodec(), model="m", **kw)


async def send(
    target: Target, spec: RequestSpec, stall: float = 5.0, total: float = 10.0, keep_text: bool = False
) -> RequestRecord:
    run_start = time.perf_counter()
    async with make_session(target) as session:
        return await send_request(
            session,
            target,
            spec,
            point="concurrency=1",
            phase="measure",
            scheduled=time.perf_counter() - run_start,
            run_start=run_start,
            timeout=timeouts_for(target.stream, stall, total),
            keep_text=keep_text,
        )


async def test_ttft_and_itl_match_the_script(server: ScriptedServer) -> None:
    rec = await send(target_for(server.url), script_spec("a", ttft=0.05, itl=0.005, n=40))
    assert rec.status == "ok", rec.error
    ttft = rec.chunk_times[0] - rec.scheduled
    assert 0.05 <= ttft <= 0.05 + TTFT_TOL_S
    gaps = [b - a for a, b in zip(rec.chunk_times, rec.chunk_times[1:], strict=False)]
    assert sum(rec.chunk_tokens) == 40
    mean_itl = (rec.chunk_times[-1] - rec.chunk_times[0]) / (sum(rec.chunk_tokens[1:]) or 1)
    assert abs(mean_itl - 0.005) <= ITL_MEAN_TOL_S, gaps
    assert rec.scheduled <= rec.sent <= rec.first_byte <= rec.chunk_times[0] <= rec.done  # type: ignore[operator]
    assert rec.token_source == "server_usage" and rec.output_tokens == 40 and rec.prompt_tokens == 7
    assert rec.client_output_tokens == 40 and rec.finish_reason == "length"
    assert rec.http_status == 200 and rec.expected_output_tokens == 40


async def test_events_arriving_together_are_one_chunk(server: ScriptedServer) -> None:
    rec = await send(target_for(server.url), script_spec("a", ttft=0.01, itl=0.01, n=9, per_chunk=3))
    assert rec.status == "ok", rec.error
    # three writes, each with three one-token events: three chunks of three tokens
    assert rec.chunk_tokens == [3, 3, 3]
    assert len(set(rec.chunk_times)) == 3


async def test_bytewise_stream_and_multibyte_text(server: ScriptedServer) -> None:
    spec = script_spec("a", n=5, text="é世🙂", mode="bytewise")
    rec = await send(target_for(server.url), spec, keep_text=True)
    assert rec.status == "ok", rec.error
    assert rec.output_text == "é世🙂" * 5 and rec.client_output_tokens == 5


async def test_usage_cached_tokens_and_client_estimate(server: ScriptedServer) -> None:
    rec = await send(target_for(server.url), script_spec("a", n=3, cached=5))
    assert rec.cached_tokens == 5 and rec.token_source == "server_usage"
    rec = await send(target_for(server.url), script_spec("b", n=3, usage=False))
    assert rec.status == "ok" and rec.token_source == "client_estimate" and rec.output_tokens == 3


async def test_http_500_is_http_error(server: ScriptedServer) -> None:
    rec = await send(target_for(server.url), script_spec("a", mode="http500"))
    assert rec.status == "http_error" and rec.http_status == 500
    assert rec.error is not None and "scripted failure" in rec.error


async def test_connection_refused_is_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rec = await send(target_for(f"http://127.0.0.1:{port}"), script_spec("a"))
    assert rec.status == "connect_error" and rec.first_byte is None and rec.done is not None


async def test_stall_is_timeout(server: ScriptedServer) -> None:
    t = time.perf_counter()
    rec = await send(target_for(server.url), script_spec("a", n=5, mode="stall"), stall=0.3)
    assert rec.status == "timeout" and rec.error is not None and "stall" in rec.error
    assert len(rec.chunk_times) == 1  # the token before the stall was kept
    assert time.perf_counter() - t < 5


async def test_overall_timeout(server: ScriptedServer) -> None:
    rec = await send(target_for(server.url), script_spec("a", n=50, itl=0.05), stall=5, total=0.5)
    assert rec.status == "timeout" and rec.error is not None and "overall" in rec.error


async def test_stream_without_done(server: ScriptedServer) -> None:
    rec = await send(target_for(server.url), script_spec("a", n=3, mode="nodone"))
    assert rec.status == "ok" and rec.tags.get("stream_end") == "eof" and rec.finish_reason == "length"
    assert rec.token_source == "client_estimate" and rec.output_tokens == 3


async def test_error_event_mid_stream(server: ScriptedServer) -> None:
    rec = await send(target_for(server.url), script_spec("a", n=5, mode="error_event"))
    assert rec.status == "stream_error" and rec.error is not None and "mid-stream" in rec.error


async def test_dropped_connection_mid_stream_is_read_error(server: ScriptedServer) -> None:
    rec = await send(target_for(server.url), script_spec("a", n=5, mode="drop"))
    assert rec.status in ("read_error", "stream_error"), rec.error
    assert rec.first_byte is not None and sum(rec.chunk_tokens) == 2


async def test_non_streamed_response(server: ScriptedServer) -> None:
    rec = await send(target_for(server.url, stream=False), script_spec("a", n=6, ttft=0.02), keep_text=True)
    assert rec.status == "ok", rec.error
    assert rec.output_tokens == 6 and rec.token_source == "server_usage" and rec.chunk_tokens == [6]
    assert rec.output_text == "tok " * 6 and rec.done is not None and rec.done - rec.scheduled >= 0.02


@pytest.mark.parametrize(("connection", "distinct"), [("keepalive", 1), ("fresh", 3)])
async def test_connection_modes(server: ScriptedServer, connection: str, distinct: int) -> None:
    target = target_for(server.url, connection=connection)
    run_start = time.perf_counter()
    async with make_session(target) as session:
        for i in range(3):
            rec = await send_request(
                session,
                target,
                script_spec(str(i), n=2),
                point="p",
                phase="measure",
                scheduled=0.0,
                run_start=run_start,
                timeout=aiohttp.ClientTimeout(total=5),
            )
            assert rec.status == "ok", rec.error
    assert len(set(server.peers)) == distinct


async def test_truncated_stream_is_stream_error(server: ScriptedServer) -> None:
    rec = await send(target_for(server.url), script_spec("a", n=3, mode="truncated"))
    assert rec.status == "stream_error" and rec.tags.get("stream_end") == "eof"
    assert rec.client_output_tokens == 3 and rec.done is not None


async def test_pooled_connections_are_dropped_before_the_server_idles_them_out() -> None:
    """A server that closes idle keep-alive connections after 0.1 s (as cpp-httplib does after 5 s), and requests
    sent around that moment: with the client's pool idle time below the server's, none fails."""
    idle = 0.1

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(idle):
                        head = await reader.readuntil(b"\r\n\r\n")
                except TimeoutError:
                    return
                length = next(
                    (
                        int(x.split(b":")[1])
                        for x in head.split(b"\r\n")
                        if x.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                body = _chunk("x", "stop") + b"data: [DONE]\n\n"
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(conn, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    target = target_for(f"http://127.0.0.1:{port}", keepalive_idle_s=idle / 2)
    run_start = time.perf_counter()
    statuses = []
    try:
        async with make_session(target) as session:
            for i in range(20):
                rec = await send_request(
                    session,
                    target,
                    script_spec(str(i), n=1),
                    point="p",
                    phase="measure",
                    scheduled=0.0,
                    run_start=run_start,
                    timeout=aiohttp.ClientTimeout(total=5),
                )
                statuses.append(rec.status)
                await asyncio.sleep(idle - 0.003 + (i % 6) * 0.001)
    finally:
        srv.close()
    assert statuses == ["ok"] * 20


async def test_body_left_open_after_done_does_not_hang(server: ScriptedServer) -> None:
    t = time.perf_counter()
    rec = await send(
        target_for(server.url), script_spec("a", n=3, mode="open_after_done"), stall=20, total=30
    )
    assert rec.status == "ok" and rec.done is not None and rec.done - rec.chunk_times[-1] < 0.5
    assert time.perf_counter() - t < 5


async def _raw_server(framing: str, close_after: bool) -> tuple[asyncio.Server, list[int]]:
    """An SSE server written on raw sockets: `framing` is "length", "chunked" (split mid-chunk-header and with a
    chunk extension) or "close" (no length: the body ends when the connection does). `close_after` closes the
    connection after every response while still saying keep-alive (what llama.cpp's server does)."""
    conns: list[int] = []

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(id(writer))
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(x.split(b":")[1])
                    for x in head.split(b"\r\n")
                    if x.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                events = [_chunk("a", role=True), _chunk("b"), _chunk("c", "stop"), b"data: [DONE]\n\n"]
                hdr = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                if framing == "length":
                    body = b"".join(events)
                    writer.write(hdr + b"Content-Length: %d\r\n\r\n" % len(body))
                    for i in range(0, len(body), 7):  # odd-sized reads
                        writer.write(body[i : i + 7])
                        await writer.drain()
                        await asyncio.sleep(0.001)
                elif framing == "chunked":
                    writer.write(hdr + b"Transfer-Encoding: chunked\r\n\r\n")
                    for ev in events:
                        framed = b"%x;ext=1\r\n%s\r\n" % (len(ev), ev)
                        writer.write(framed[:2])  # split inside the size line
                        await writer.drain()
                        await asyncio.sleep(0.002)
                        writer.write(framed[2:])
                        await writer.drain()
                        await asyncio.sleep(0.002)
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(hdr + b"Connection: close\r\n\r\n" + b"".join(events))
                await writer.drain()
                if close_after or framing == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(conn, "127.0.0.1", 0)
    return srv, conns


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
@pytest.mark.parametrize("close_after", [False, True])
async def test_body_framings_and_servers_that_close_after_each_response(
    framing: str, close_after: bool
) -> None:
    srv, conns = await _raw_server(framing, close_after)
    port = srv.sockets[0].getsockname()[1]
    target = target_for(f"http://127.0.0.1:{port}", connection="keepalive")
    run_start = time.perf_counter()
    recs = []
    try:
        async with make_session(target) as session:
            for i in range(4):
                recs.append(
                    await send_request(
                        session, target, script_spec(str(i), n=3), point="p", phase="measure", scheduled=0.0,
                        run_start=run_start, timeout=timeouts_for(True, 5.0, 10.0), keep_text=True,
                    )
                )  # fmt: skip
                await asyncio.sleep(0.02)  # the server's close reaches the client before the next request
    finally:
        srv.close()
    for rec in recs:
        assert rec.status == "ok", rec.error
        assert rec.output_text == "abc" and rec.finish_reason == "stop" and rec.client_output_tokens == 3
        assert rec.done is not None and rec.done >= rec.chunk_times[-1]
    reused = framing != "close" and not close_after
    assert len(conns) == (1 if reused else 4)  # keep-alive reused when allowed, a closed connection never


async def test_chunk_times_are_the_reads_not_the_parse() -> None:
    """Chunked events written >= 4 ms apart (two writes 2 ms apart each): each token's time is its own read's."""
    srv, _ = await _raw_server("chunked", False)
    port = srv.sockets[0].getsockname()[1]
    target = target_for(f"http://127.0.0.1:{port}")
    try:
        rec = await send(target, script_spec("t", n=3))
    finally:
        srv.close()
    assert rec.status == "ok" and rec.chunk_tokens == [1, 1, 1]
    gaps = [b - a for a, b in zip(rec.chunk_times, rec.chunk_times[1:], strict=False)]
    assert all(g >= 0.0035 for g in gaps), (
        gaps
    )  # two 2 ms writes per event: never less than the server's 4 ms


class _TextCodec(OpenAICodec):
    """Each `data:` payload is one token whose text is the payload itself."""

    def parse_event(self, data: bytes) -> StreamDelta | None:
        return StreamDelta(text=data.decode(), tokens=1)


class _NoConn:
    def _wake(self) -> None:
        pass


_line = st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=30)


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(st.lists(_line, min_size=1, max_size=2), min_size=1, max_size=8),
    eols=st.lists(st.sampled_from(["\n", "\n", "\r\n", "\r"]), min_size=3, max_size=3),
    space=st.booleans(),
    comment=st.booleans(),
    per_read=st.sampled_from(["chunk", "cuts"]),
    data=st.data(),
)
def test_every_read_of_a_chunked_sse_body_gives_the_same_events(
    events: list[list[str]], eols: list[str], space: bool, comment: bool, per_read: str, data: st.DataObject
) -> None:
    """A read holding one whole HTTP chunk of one whole one-line event is taken in one pass (`_StreamReader.feed`);
    every other read goes through the framing and the SSE parser. Both give exactly the events sent, and each read
    that carried tokens is one chunk time."""
    sep = ": " if space else ":"
    line_end, last_end, blank = eols  # line endings may be mixed (LF, CRLF, CR): the parser takes any
    if last_end == "\r" and blank == "\n":
        blank = "\r\n"  # CR then LF is one line ending, not an empty line
    blocks = [
        (f": ping{line_end}" if comment else "")
        + "".join(
            f"data{sep}{line}{line_end if i < len(lines) - 1 else last_end}" for i, line in enumerate(lines)
        )
        + blank
        for lines in events
    ] + [f"data{sep}[DONE]{last_end}{blank}"]
    if comment:  # a keep-alive comment of its own, as servers send between tokens
        blocks.insert(len(blocks) // 2, f": keep-alive{last_end}{blank}")
    # HTTP chunks: mostly one event each; some events cut in two (anywhere, or before each of their lines: the
    # last line then looks like a whole event while the parser still holds the first), some sent with the one before
    chunks: list[bytes] = []
    for block in blocks:
        raw = block.encode()
        how = data.draw(st.sampled_from(["whole", "whole", "split", "lines", "join"]))
        if how == "split" and len(raw) > 1:
            cut = data.draw(st.integers(1, len(raw) - 1))
            chunks += [raw[:cut], raw[cut:]]
        elif how == "lines":
            starts = [i for i in range(1, len(raw)) if raw.startswith(b"data", i)]
            chunks += [raw[a:b] for a, b in zip([0, *starts], [*starts, len(raw)], strict=False)]
        elif how == "join" and chunks:
            chunks[-1] += raw
        else:
            chunks.append(raw)
    wire = [f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks] + [b"0\r\n\r\n"]
    if per_read == "chunk":
        reads = wire
    else:
        body = b"".join(wire)
        cuts = sorted(set(data.draw(st.lists(st.integers(1, len(body) - 1), max_size=10))))
        reads = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=False)]
    rec = RequestRecord("r", "e", "p", "measure", 0.0)
    texts: list[str] = []
    framing = _Framing("chunked")
    reader = _StreamReader(_NoConn(), framing, rec, _TextCodec(), 0.0, texts)  # type: ignore[arg-type]
    for i, read in enumerate(reads):
        reader.feed(float(i), read)
    # one space after the colon is dropped (after "data:" it is the line's own); an empty payload carries nothing
    values = [
        [line[1:] if not space and line.startswith(" ") else line for line in lines] for lines in events
    ]
    want = [text for lines in values if (text := "\n".join(lines))]
    assert texts == want
    assert sum(rec.chunk_tokens) == len(want)
    assert len(set(rec.chunk_times)) == len(rec.chunk_times) and rec.done is not None
    assert framing.done and reader.saw_done


def test_a_read_that_ends_inside_an_http_chunk_is_not_taken_for_a_whole_one() -> None:
    """A read that looks like one whole chunk of one event ("…\\n\\n\\r\\n") but stops inside a longer chunk (whose
    data goes on after an empty CRLF line) is framed by its size line, not by its look."""
    first, inner = b"data: first\n\n", b"data: a\n\n\r\ndata: b\n\n"
    wire = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in (first, inner)) + b"0\r\n\r\n"
    cuts = [
        0,
        wire.index(b"data: a") - 4,
        wire.index(b"data: b"),
        len(wire),
    ]  # the second read starts at its size line
    texts: list[str] = []
    rec = RequestRecord("r", "e", "p", "measure", 0.0)
    reader = _StreamReader(_NoConn(), _Framing("chunked"), rec, _TextCodec(), 0.0, texts)  # type: ignore[arg-type]
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        reader.feed(float(i), wire[a:b])
    assert texts == ["first", "a", "b"] and rec.chunk_times == [0.0, 1.0, 2.0]
