"""Incremental Server-Sent Events parser on bytes: transport reads in, complete `data:` payloads out.

Correct across any split of the stream (inside `data:`, inside a CRLF, inside a multi-byte UTF-8 character: nothing is
decoded here), for LF, CRLF and CR line endings, with comments and non-data fields ignored, and with no line-length
limit (a 64 KB read buffer is how vllm#39963 lost throughput on long outputs). This is the client's hot path:
events are found with `bytes.find` on a buffer, never with a per-byte loop.

Semantics follow the WHATWG EventSource parsing rules for the `data` field: one optional space after the colon is
dropped, several `data:` lines of one event are joined with b"\\n", an event is dispatched at a blank line. The
`[DONE]` sentinel is an ordinary payload here; the client decides what it means. `close()` is lenient where the spec
is strict: a last event not followed by a blank line is still returned (some servers end the stream without one).
"""

from __future__ import annotations

__all__ = ["SSEParser"]

_BOM = b"\xef\xbb\xbf"


class SSEParser:
    """Feed raw reads with `feed`; each call returns the payloads of the events the read completed."""

    __slots__ = ("_bom_checked", "_buf", "_scan", "_skip_lf", "idle")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scan = 0  # where to resume looking for the blank line that ends an event
        self._skip_lf = False  # the last read ended in CR: a LF starting the next read belongs to it
        self._bom_checked = False
        # nothing held and nothing owed: the next byte starts a new line of a new event (a caller that recognises
        # a whole one-line event itself may then take its payload without feeding it)
        self.idle = False

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a complete event."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        if not chunk:
            self.idle = not self._buf and not self._skip_lf and self._bom_checked
            return []
        if b"\r" in chunk:
            # CR and LF never occur inside a field value or a UTF-8 sequence, so normalising is safe
            self._skip_lf = chunk[-1] == 0x0D
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf
        if (
            not buf
            and chunk.startswith(b"data:")
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.endswith(b"\n\n")
            and self._bom_checked
        ):  # the common read: exactly one whole one-line data event (a token chunk), nothing pending
            self.idle = not self._skip_lf
            return [chunk[6:-2] if chunk[5:6] == b" " else chunk[5:-2]]
        buf += chunk
        if not self._bom_checked:
            if len(buf) < 3 and _BOM.startswith(bytes(buf)):
                return []
            self._bom_checked = True
            if buf.startswith(_BOM):
                del buf[:3]
        out: list[bytes] = []
        pos = 0
        find = buf.find
        end = find(b"\n\n", self._scan)
        while end >= 0:
            self._dispatch(bytes(buf[pos:end]), out)
            pos = end + 2
            end = find(b"\n\n", pos)
        if pos:
            del buf[:pos]
        # resume the next search here: a long event is scanned once, not once per read
        self._scan = len(buf) - 1 if buf else 0
        self.idle = not buf and not self._skip_lf
        return out

    def close(self) -> list[bytes]:
        """End of stream: return a last event that had no terminating blank line, then reset."""
        out: list[bytes] = []
        if self._buf:
            self._dispatch(bytes(self._buf).rstrip(b"\n"), out)
        self._buf.clear()
        self._scan = 0
        self._skip_lf = False
        self.idle = self._bom_checked
        return out

    def _dispatch(self, block: bytes, out: list[bytes]) -> None:
        """One event's lines (no blank line inside) -> its data payload, if it had a data field."""
        if block.startswith(b"data:") and b"\n" not in block:  # the common one-line event
            out.append(block[6:] if block[5:6] == b" " else block[5:])
            return
        data: list[bytes] | None = None
        for line in block.split(b"\n"):
            if not line or line[0] == 0x3A:  # blank (only at the start) or a comment
                continue
            colon = line.find(b":")
            if colon < 0:
                name, value = line, b""
            else:
                name = line[:colon]
                value = line[colon + 2 :] if line[colon + 1 : colon + 2] == b" " else line[colon + 1 :]
            if name == b"data":
                if data is None:
                    data = []
                data.append(value)
        if data is not None:
            out.append(b"\n".join(data))
