"""Tokenizers that prompts are measured with: the served model's, never a guess (pitfall 2: tokenizer mismatch).

Three implementations of one `Tokenizer` protocol:

- `EngineTokenizer`: the engine's own tokenize endpoint over HTTP (vLLM `POST /tokenize`, llama.cpp `POST /tokenize`,
  `/detokenize`, `/apply-template`). The truth for what that engine will prefill. Used before a run to build the
  prompts, never during one; it is the only place under `workloads/` that talks to a socket, and only when the
  composition root hands one in.
- `LocalTokenizer`: the model's tokenizer (+ chat template) read from disk with the `tokenizers` library: a Hugging
  Face folder, its `tokenizer.json` file, or the tokenizer a GGUF file embeds. Never downloads anything.
- `SimpleTokenizer`: a deterministic, model-free tokenizer FOR TESTS ONLY. Its counts mean nothing for any model.

`ChosenTokenizer` says whether the one a run builds prompts with is the served model's own (exact lengths) or a
stand-in (approximate lengths: the server's usage then gives the actual ones). `NoTokenizeRoute` is the engine
answering that it has no tokenize endpoint (a proxy, a hosted API), which a run takes as "use a stand-in".

`count_prompt` is what the engine prefills for a completions prompt (special tokens such as BOS included);
`count_chat` is what it prefills for a chat request after its chat template (pitfall: templates add tokens the client
never counted, evalscope PR#1289).
"""

from __future__ import annotations

import functools
import json
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from harness.errors import ConfigError, EndpointError

__all__ = [
    "ChosenTokenizer",
    "EngineTokenizer",
    "LocalTokenizer",
    "NoTokenizeRoute",
    "SimpleTokenizer",
    "Tokenizer",
    "render_chat_template",
    "tokenizer_from",
]

Messages = Sequence[Mapping[str, str]]


@runtime_checkable
class Tokenizer(Protocol):
    """What prompt synthesis needs from a tokenizer. `encode` adds no special tokens."""

    @property
    def name(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def count_prompt(self, text: str) -> int:
        """Tokens the engine prefills for this completions prompt (special tokens included)."""
        ...

    def count_chat(self, messages: Messages) -> int:
        """Tokens the engine prefills for these chat messages after its template, with the generation prompt."""
        ...


# --------------------------------------------------------------------------------------------- test tokenizer

_PIECE = re.compile(r"<\|[a-z_]+\|>| ?(?:(?!<\|[a-z_]+\|>)\S){1,4}|\s", re.DOTALL)


class SimpleTokenizer:
    """A deterministic tokenizer for tests without a model. NOT a model tokenizer: counts are meaningless for engines.

    A token is a special token (`<|im_start|>`), a space-led run of up to 4 non-space characters, or one whitespace
    character; its id is its UTF-8 bytes read as an integer, so decode needs no vocabulary. Like BPE, concatenating two texts can merge tokens at the
    boundary ("ab" + "cd" is one token), which exercises the exact-length logic. The chat template is ChatML-like.
    """

    name = "simple-test-tokenizer (not a model tokenizer)"

    def encode(self, text: str) -> list[int]:
        return [int.from_bytes(b"\x01" + piece.encode(), "big") for piece in _PIECE.findall(text)]

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            raw = i.to_bytes((i.bit_length() + 7) // 8, "big")
            out.append(raw[1:].decode())
        return "".join(out)

    def count_prompt(self, text: str) -> int:
        return len(self.encode(text))

    def count_chat(self, messages: Messages) -> int:
        rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return len(self.encode(rendered + "<|im_start|>assistant\n"))


# --------------------------------------------------------------------------------------------- local (HF folder, GGUF)

_GGUF_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
)
# llama.cpp pre-tokenizer types rebuilt here -> whether digits are split one by one before the GPT-2 regex
# (llama-vocab.cpp: SMOLLM uses "\\p{N}" then the GPT-2 pattern; GPT2 the GPT-2 pattern alone)
_GGUF_PRE = {"smollm": True, "gpt-2": False, "gpt2": False, "default": False}


def render_chat_template(template: str, messages: Messages, special: Mapping[str, str]) -> str:
    """Render a Hugging Face chat template the way transformers does (sandboxed jinja2, trim/lstrip blocks)."""
    return _compiled_template(template).render(
        messages=[dict(m) for m in messages], add_generation_prompt=True, **special
    )


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str) -> Any:
    """A chat template compiled once: compiling costs milliseconds, and a codec that renders on the send path (a
    client-side template, Triton's native protocol) renders one per request."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class LocalTokenizer:
    """The model's own tokenizer read from disk with the `tokenizers` library; never touches the network.

    `path` is a Hugging Face folder (`tokenizer.json`, `tokenizer_config.json`, optionally
    `chat_template.jinja`), a `tokenizer.json` file (its folder's `tokenizer_config.json` and
    `chat_template.jinja` are read when present), or a GGUF file, whose embedded tokenizer (gpt2-style BPE:
    `tokenizer.ggml.tokens`, `merges`, `pre`) and chat template are rebuilt with the pre-tokenizer llama.cpp uses
    for that `pre` type.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        try:
            import tokenizers  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ConfigError(
                "the local tokenizer needs the `tokenizers` package: pip install tokenizers"
            ) from e
        self._add_bos: str | None = None  # a GGUF that asks for BOS: prepended by count_prompt
        if self.path.is_file() and self.path.suffix == ".gguf":
            self._from_gguf()
        elif self.path.is_file() and self.path.suffix == ".json":
            self._from_folder(self.path.parent, self.path)
        elif (self.path / "tokenizer.json").is_file():
            self._from_folder(self.path, self.path / "tokenizer.json")
        else:
            raise ConfigError(
                f"no tokenizer at {self.path}: point at the model's Hugging Face folder (with tokenizer.json), "
                "its tokenizer.json or its .gguf file"
            )
        self.name = (
            f"local:{self.path.parent.name}/{self.path.name}"
            if self.path.suffix == ".json"
            else f"local:{self.path.name}"
        )

    def _from_folder(self, folder: Path, tokenizer_json: Path) -> None:
        from tokenizers import Tokenizer as HfTokenizer

        try:
            self._tok = HfTokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the library raises a bare Exception for a file it cannot parse
            raise ConfigError(
                f"{tokenizer_json} is not a tokenizer the `tokenizers` library reads ({e}); give the model's "
                "tokenizer.json (as saved by transformers or tokenizers) or its .gguf file"
            ) from None
        self._dir = folder
        config_path = folder / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self._special = {
            key: text
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(config.get(key))) is not None
        }
        self._template = self._find_template(config)

    def _from_gguf(self) -> None:
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HfTokenizer

        from workloads.gguf import read_metadata

        meta = read_metadata(self.path, [k for k in _GGUF_TOKENIZER_KEYS])
        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
        if kind != "gpt2" or pre not in _GGUF_PRE:
            raise ConfigError(
                f"{self.path}: its tokenizer ({kind}, pre-tokenizer {pre}) is not one EngineBench rebuilds from a "
                "GGUF; use the model's Hugging Face folder or the engine's tokenize endpoint"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tok = HfTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if _GGUF_PRE[pre]
            else byte_level
        )
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types, strict=False)
                if ty == 3
            ]
        )
        self._tok = tok

        def token(key: str) -> str | None:
            i = meta.get(key)
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        self._special = {
            name: text
            for name, key in (
                ("bos_token", "bos_token_id"),
                ("eos_token", "eos_token_id"),
                ("unk_token", "unknown_token_id"),
                ("pad_token", "padding_token_id"),
            )
            if (text := token(f"tokenizer.ggml.{key}")) is not None
        }
        if meta.get("tokenizer.ggml.add_bos_token"):
            self._add_bos = self._special.get("bos_token")
        template = meta.get("tokenizer.chat_template")
        self._template = template if isinstance(template, str) else None

    def _find_template(self, config: Mapping[str, Any]) -> str | None:
        jinja = self._dir / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default") or next(iter(named.values()), None)
        return template if isinstance(template, str) else None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False))

    def count_prompt(self, text: str) -> int:
        # a GGUF's rebuilt tokenizer has no post-processor: llama.cpp adds its BOS itself when the file asks
        bos = 0 if self._add_bos is None else 1
        return len(self._tok.encode(text, add_special_tokens=True).ids) + bos

    def chat_prompt(self, messages: Messages) -> str:
        if self._template is None:
            raise ConfigError(f"{self.path} has no chat template: use api=completions or an engine tokenizer")
        return render_chat_template(self._template, messages, self._special)

    def count_chat(self, messages: Messages) -> int:
        # transformers' apply_chat_template tokenizes the rendered text without adding special tokens again.
        # llama.cpp (a GGUF that asks for BOS) strips a leading BOS from the rendered text and tokenizes it with
        # BOS added (llama.cpp b11434 common/chat.cpp, `if (inputs.add_bos && string_starts_with(result, bos))`)
        rendered = self.chat_prompt(messages)
        if self._add_bos is None:
            return len(self._tok.encode(rendered, add_special_tokens=False).ids)
        rendered = rendered.removeprefix(self._add_bos)
        return len(self._tok.encode(rendered, add_special_tokens=False).ids) + 1


# --------------------------------------------------------------------------------------------- engine endpoint

Dialect = Literal["vllm", "llamacpp"]
# statuses that mean "no such route here" (not found, method not allowed, not implemented), not a failing engine
_NO_ROUTE = frozenset({404, 405, 501})


class NoTokenizeRoute(EndpointError):
    """The server answered that it has no tokenize endpoint (a proxy or hosted API in front of the engine)."""


class EngineTokenizer:
    """The engine's tokenize endpoint (synchronous: prompts are built before a run starts).

    `dialect` picks the request shapes: "vllm" (`/tokenize {model, prompt | messages}` -> `{tokens, count}`,
    `/detokenize {model, tokens}` -> `{prompt}`) or "llamacpp" (`/tokenize {content}` -> `{tokens}`,
    `/detokenize {tokens}` -> `{content}`, `/apply-template {messages}` -> `{prompt}`).
    """

    def __init__(
        self,
        base_url: str,
        dialect: Dialect,
        model: str | None = None,
        timeout: float = 60.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if dialect == "vllm" and not model:
            raise ConfigError("the vLLM tokenize endpoint needs the served model name: pass model=")
        self.base_url = base_url.rstrip("/")
        self.dialect = dialect
        self.model = model
        self.timeout = timeout
        self.headers = dict(headers or {})  # e.g. the API key's Authorization (never part of `name`)
        self.name = f"engine:{dialect}:{self.base_url}"

    def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        url = self.base_url + path
        headers = {"Content-Type": "application/json", **self.headers}
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode(errors="replace")
            error = NoTokenizeRoute if e.code in _NO_ROUTE else EndpointError
            raise error(f"POST {url} failed: HTTP {e.code} {detail}; does this engine offer {path}?") from e
        except (urllib.error.URLError, OSError) as e:
            raise EndpointError(f"POST {url} failed: {e}; is the engine running?") from e
        if not isinstance(answer, dict):
            raise EndpointError(f"POST {url} returned {type(answer).__name__}, expected a JSON object")
        return answer

    def _tokens(self, answer: Mapping[str, Any], path: str) -> list[int]:
        tokens = answer.get("tokens")
        if not isinstance(tokens, list):
            raise EndpointError(f"{self.base_url}{path} answered without `tokens`: {str(answer)[:200]}")
        # llama.cpp returns [{id, piece}] when asked for pieces; plain ids otherwise
        return [int(t["id"]) if isinstance(t, Mapping) else int(t) for t in tokens]

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        if self.dialect == "vllm":
            body: dict[str, Any] = {"model": self.model, "prompt": text, "add_special_tokens": add_special}
        else:
            body = {"content": text, "add_special": add_special}
        return self._tokens(self._post("/tokenize", body), "/tokenize")

    def encode(self, text: str) -> list[int]:
        return self._tokenize(text, add_special=False)

    def decode(self, ids: Sequence[int]) -> str:
        if self.dialect == "vllm":
            answer = self._post("/detokenize", {"model": self.model, "tokens": list(ids)})
            text = answer.get("prompt")
        else:
            text = self._post("/detokenize", {"tokens": list(ids)}).get("content")
        if not isinstance(text, str):
            raise EndpointError(f"{self.base_url}/detokenize answered without text")
        return text

    def count_prompt(self, text: str) -> int:
        return len(self._tokenize(text, add_special=True))

    def count_chat(self, messages: Messages) -> int:
        msgs = [dict(m) for m in messages]
        if self.dialect == "vllm":
            body = {"model": self.model, "messages": msgs, "add_generation_prompt": True}
            return len(self._tokens(self._post("/tokenize", body), "/tokenize"))
        prompt = self._post("/apply-template", {"messages": msgs}).get("prompt")
        if not isinstance(prompt, str):
            raise EndpointError(f"{self.base_url}/apply-template answered without `prompt`")
        # llama-server tokenizes a templated chat prompt with special tokens added and parsed
        body2 = {"content": prompt, "add_special": True, "parse_special": True}
        return len(self._tokens(self._post("/tokenize", body2), "/tokenize"))


@dataclass(frozen=True)
class ChosenTokenizer:
    """The tokenizer a run builds an engine's prompts with, and whether its counts are the served model's.

    `exact` is True for the engine's own tokenize endpoint, the model files it was launched from, or a tokenizer
    the user named (`--tokenizer`); False for a stand-in, whose prompt lengths are approximate (the server's usage
    then says what they were). `why` is one line for the run's events and notes.
    """

    tokenizer: Tokenizer
    exact: bool
    why: str


def tokenizer_from(spec: str) -> Tokenizer:
    """A tokenizer from a command-line value: `simple` (tests only), a Hugging Face folder,
    `llamacpp:URL`, or `vllm:URL:MODEL` (the engine's tokenize endpoint)."""
    if spec == "simple":
        return SimpleTokenizer()
    dialect, sep, rest = spec.partition(":")
    if sep and dialect in ("llamacpp", "vllm") and rest:
        if dialect == "llamacpp":
            return EngineTokenizer(rest, "llamacpp")
        url, _, model = rest.rpartition(":")
        if not url.startswith("http") or not model:
            raise ConfigError(
                f"tokenizer {spec!r}: write vllm:URL:MODEL, e.g. vllm:http://127.0.0.1:8000:my-model"
            )
        return EngineTokenizer(url, "vllm", model)
    if Path(spec).expanduser().exists():
        return LocalTokenizer(spec)
    raise ConfigError(
        f"tokenizer {spec!r}: expected `simple`, a model folder with tokenizer.json, a tokenizer.json, a .gguf "
        "file, llamacpp:URL or vllm:URL:MODEL"
    )
