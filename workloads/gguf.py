"""Reading a GGUF file's metadata (key/value header), without loading tensors and without extra packages.

Used for a variant's file type (`general.file_type`) and for the tokenizer a GGUF carries (`tokenizer.ggml.*`,
`tokenizer.chat_template`). Format: magic "GGUF", u32 version, u64 tensor count, u64 key count, then per key a
length-prefixed UTF-8 name, a u32 value type and the value (arrays: u32 element type, u64 count, elements).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Collection
from pathlib import Path
from typing import Any, BinaryIO

from harness.errors import ConfigError

__all__ = ["FILE_TYPES", "read_metadata"]

# llama.cpp's LLAMA_FTYPE values (general.file_type)
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 15: "Q4_K_M", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}  # fmt: skip

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    return f.read(_read(f, "<Q")).decode("utf-8", errors="surrogateescape")


def _value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        etype, count = _read(f, "<I"), _read(f, "<Q")
        if etype in _SCALARS:
            size = struct.calcsize(_SCALARS[etype])
            if not keep:
                f.seek(size * count, os.SEEK_CUR)
                return None
            return list(struct.unpack(f"<{count}{_SCALARS[etype][1]}", f.read(size * count)))
        return [_value(f, etype, keep) for _ in range(count)]
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_metadata(path: str | Path, keys: Collection[str] | None = None) -> dict[str, Any]:
    """The header's key/values (only `keys` when given: others are skipped without decoding big arrays)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ConfigError(f"{path} is not a GGUF file")
            _read(f, "<I")  # version
            _read(f, "<Q")  # tensor count
            out: dict[str, Any] = {}
            for _ in range(_read(f, "<Q")):
                key = _string(f)
                wanted = keys is None or key in keys
                value = _value(f, _read(f, "<I"), wanted)
                if wanted:
                    out[key] = value
                    if keys is not None and len(out) == len(keys):
                        break
            return out
    except (ValueError, struct.error) as e:
        raise ConfigError(f"{path}: unreadable GGUF header ({e})") from None
