"""SSEParser against the event-stream rules, with every way a transport can split the bytes."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.openai import parse_openai_event
from harness.sse import SSEParser

# payload text that cannot contain line breaks (a data value never does); includes multi-byte characters
_payload = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=40
).map(lambda s: s.encode())


def _encode(events: list[list[bytes]], eol: bytes, comments: bool) -> bytes:
    out = bytearray()
    for lines in events:
        if comments:
            out += b": keep-alive" + eol
        out += b"event: message" + eol + b"id: 7" + eol
        for line in lines:
            out += b"data: " + line + eol
        out += eol
    return bytes(out)


def _feed_split(stream: bytes, cuts: list[int]) -> list[bytes]:
    parser = SSEParser()
    out: list[bytes] = []
    prev = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        out += parser.feed(stream[prev:cut])
        prev = cut
    out += parser.close()
    return out


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(st.lists(_payload, min_size=1, max_size=3), max_size=8),
    eol=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    comments=st.booleans(),
    data=st.data(),
)
def test_any_split_gives_exactly_the_events(
    events: list[list[bytes]], eol: bytes, comments: bool, data: st.DataObject
) -> None:
    stream = _encode(events, eol, comments)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert _feed_split(stream, cuts) == [b"\n".join(lines) for lines in events]


def test_every_single_byte_split_of_crlf_and_utf8() -> None:
    stream = "data: héllo 世界 🙂\r\n\r\ndata: [DONE]\r\n\r\n".encode()
    for cut in range(len(stream) + 1):
        assert _feed_split(stream, [cut]) == ["héllo 世界 🙂".encode(), b"[DONE]"], cut
    # byte by byte
    assert _feed_split(stream, list(range(len(stream)))) == ["héllo 世界 🙂".encode(), b"[DONE]"]


def test_multibyte_char_split_between_reads_is_not_decoded_early() -> None:
    parser = SSEParser()
    raw = "data: 🙂\n\n".encode()
    i = raw.index(b"\xf0") + 2  # inside the 4-byte emoji
    assert parser.feed(raw[:i]) == []
    [payload] = parser.feed(raw[i:])
    assert payload.decode() == "🙂"


def test_two_megabyte_line() -> None:
    big = b"x" * (2 * 1024 * 1024)
    stream = b'data: {"t": "' + big + b'"}\n\n'
    parser = SSEParser()
    out: list[bytes] = []
    for i in range(0, len(stream), 65536):
        out += parser.feed(stream[i : i + 65536])
    assert len(out) == 1 and orjson.loads(out[0])["t"] == big.decode()


def test_field_forms() -> None:
    p = SSEParser()
    assert p.feed(b"data:nospace\n\n") == [b"nospace"]
    assert p.feed(b"data:  two spaces\n\n") == [b" two spaces"]
    assert p.feed(b"data\n\n") == [b""]  # a field name without colon: empty value
    assert p.feed(b": comment only\n\n") == []  # no data field: nothing dispatched
    assert p.feed(b"event: ping\nid: 3\nretry: 10\n\n") == []
    assert p.feed(b"data: a\ndata: b\n\n") == [b"a\nb"]


def test_bom_stripped_at_stream_start_only() -> None:
    p = SSEParser()
    assert p.feed(b"\xef\xbb") == []
    assert p.feed(b"\xbfdata: x\n\n") == [b"x"]


def test_stream_without_blank_line_at_end() -> None:
    p = SSEParser()
    assert p.feed(b"data: a\n\ndata: [DONE]\n") == [b"a"]
    assert p.close() == [b"[DONE]"]
    assert p.feed(b"data: b") == [] and p.close() == [b"b"]


def test_openai_chunk_kinds_through_parser_and_codec() -> None:
    """Role-only, empty, multi-token, finish, usage-only chunks and [DONE], as vLLM / llama.cpp send them."""
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": None}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hello wor"}}]},
        {"choices": [{"index": 0, "delta": {"content": "ld"}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}},
    ]
    stream = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    payloads = _feed_split(stream, [13, 100, 101, 250])
    assert payloads[-1] == b"[DONE]"
    deltas = [parse_openai_event(p) for p in payloads[:-1]]
    assert [d.tokens if d else None for d in deltas] == [0, 0, 1, 1, 0]
    assert deltas[3] is not None and deltas[3].finish_reason == "length"
    assert deltas[4] is not None and deltas[4].usage is not None and deltas[4].usage.completion_tokens == 3
