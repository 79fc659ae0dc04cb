"""Tokenizers that prompts are measured with: the served model's, never a guess (pitfall 2: tokenizer mismatch).

Three implementations of one `Tokenizer` protocol:

- `EngineTokenizer`: the engine's own tokenize endpoint over HTTP (vLLM `POST /tokenize`, llama.cpp `POST /tokenize`,
  `/detokenize`, `/apply-template`). The truth for what that engine will prefill. Used before a run to build the
  prompts, never during one; it is the only place under `workloads/` that talks to a socket, and only when the
  composition root hands one in.
- `LocalTokenizer`: the model's `tokenizer.json` (+ chat template) read from a Hugging Face folder on disk with the
  `tokenizers` library. Never downloads anything.
- `SimpleTokenizer`: a deterministic, model-free tokenizer FOR TESTS ONLY. Its counts mean nothing for any model.

`count_prompt` is what the engine prefills for a completions prompt (special tokens such as BOS included);
`count_chat` is what it prefills for a chat request after its chat template (pitfall: templates add tokens the client
never counted, evalscope PR#1289).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from harness.errors import ConfigError, EndpointError

__all__ = [
    "EngineTokenizer",
    "LocalTokenizer",
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


# --------------------------------------------------------------------------------------------- local (HF folder)


def render_chat_template(template: str, messages: Messages, special: Mapping[str, str]) -> str:
    """Render a Hugging Face chat template the way transformers does (sandboxed jinja2, trim/lstrip blocks)."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=[dict(m) for m in messages], add_generation_prompt=True, **special
    )


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class LocalTokenizer:
    """The model's tokenizer from a Hugging Face folder on disk (`tokenizer.json`, `tokenizer_config.json`,
    optionally `chat_template.jinja`). Needs the `tokenizers` package; never touches the network."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"no tokenizer.json in {self.folder}: point at the model's Hugging Face folder")
        try:
            from tokenizers import Tokenizer as HfTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ConfigError("the local tokenizer needs the `tokenizers` package: pip install tokenizers") from e
        self._tok = HfTokenizer.from_file(str(path))
        config_path = self.folder / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self._special = {
            key: text
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(config.get(key))) is not None
        }
        self._template = self._find_template(config)
        self.name = f"local:{self.folder.name}"

    def _find_template(self, config: Mapping[str, Any]) -> str | None:
        jinja = self.folder / "chat_template.jinja"
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
        return len(self._tok.encode(text, add_special_tokens=True).ids)

    def chat_prompt(self, messages: Messages) -> str:
        if self._template is None:
            raise ConfigError(f"{self.folder} has no chat template: use api=completions or an engine tokenizer")
        return render_chat_template(self._template, messages, self._special)

    def count_chat(self, messages: Messages) -> int:
        # transformers' apply_chat_template tokenizes the rendered text without adding special tokens again
        return len(self._tok.encode(self.chat_prompt(messages), add_special_tokens=False).ids)


# --------------------------------------------------------------------------------------------- engine endpoint

Dialect = Literal["vllm", "llamacpp"]


class EngineTokenizer:
    """The engine's tokenize endpoint (synchronous: prompts are built before a run starts).

    `dialect` picks the request shapes: "vllm" (`/tokenize {model, prompt | messages}` -> `{tokens, count}`,
    `/detokenize {model, tokens}` -> `{prompt}`) or "llamacpp" (`/tokenize {content}` -> `{tokens}`,
    `/detokenize {tokens}` -> `{content}`, `/apply-template {messages}` -> `{prompt}`).
    """

    def __init__(self, base_url: str, dialect: Dialect, model: str | None = None, timeout: float = 60.0) -> None:
        if dialect == "vllm" and not model:
            raise ConfigError("the vLLM tokenize endpoint needs the served model name: pass model=")
        self.base_url = base_url.rstrip("/")
        self.dialect = dialect
        self.model = model
        self.timeout = timeout
        self.name = f"engine:{dialect}:{self.base_url}"

    def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        url = self.base_url + path
        req = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode(errors="replace")
            raise EndpointError(f"POST {url} failed: HTTP {e.code} {detail}; does this engine offer {path}?") from e
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
            raise ConfigError(f"tokenizer {spec!r}: write vllm:URL:MODEL, e.g. vllm:http://127.0.0.1:8000:my-model")
        return EngineTokenizer(url, "vllm", model)
    if Path(spec).expanduser().is_dir():
        return LocalTokenizer(spec)
    raise ConfigError(
        f"tokenizer {spec!r}: expected `simple`, a model folder with tokenizer.json, llamacpp:URL or vllm:URL:MODEL"
    )
