"""Prompt synthesis to exact token counts, measured with the served model's tokenizer.

Text is a run of space-led words (" w1 w2 ... wk") drawn from a fixed vocabulary by a seeded generator. With
byte-level BPE (GPT-2-style pre-tokenization) and sentencepiece alike, a space-led word never merges with its
neighbour, so lengths add up across segments; we never rely on it, though: every text is re-encoded and trimmed or
extended until the count is exact, because merges at a boundary can change it.

`PromptBuilder.prompt` hits a target length of the *templated* prompt for chat requests (what the engine prefills),
and records the content tokens separately.

The `salt` (a run's prompt key, docs/workloads.md "Fresh prompts") goes into every text's key: the same seed and
salt give the same texts, another salt other words of the same lengths. Lengths never depend on it, so a run keeps
its seed's distribution and still sends prompts no engine has seen (pitfall 12: caches warmed by an earlier run).
The empty salt gives the texts of a workload's seed alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from harness.errors import ConfigError
from workloads.spec import Api, Message
from workloads.tokenizer import Tokenizer

__all__ = ["VOCABULARY", "BuiltPrompt", "PromptBuilder", "TextBuilder", "rng_for", "tags_of"]

VOCABULARY: tuple[str, ...] = tuple(
    """
    the of and to in is was for on that with as by at from his her it an were are which this be or has had not but
    one their they its also first new after two who been more other have all when there into some time year most
    city during only over can years many three people world may such where would later between both made while used
    state known well under part river school since area being national north south east west water house number
    small large long high great early old young little good public center system history music family group team
    game film book war life work day way home court church line land power road market company season record album
    player village county station island light street garden table window letter paper stone glass bridge tower
    mountain valley forest field ocean planet engine signal energy metal cloud winter summer spring autumn morning
    evening night story voice color sound question answer reason method result value model theory process problem
    design report study science nature animal plant bird horse river lake coast harbor border region province
    capital empire kingdom army battle treaty party member leader office council law rule order price trade money
    bank coin gold silver iron copper bread fruit apple orange wine salt sugar milk coffee tea dinner kitchen room
    door floor wall roof chair bed clock bell drum song dance poem novel author artist painter teacher student
    doctor farmer sailor soldier driver writer reader simple quick bright dark quiet calm warm cold fresh clear
    """.split()
)


def rng_for(*key: int | str) -> np.random.Generator:
    """A generator seeded from a key (seed, request index, purpose...): stable across runs, machines and versions."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(np.frombuffer(digest, dtype=np.uint32).tolist())


def _words(key: Sequence[int | str]) -> Iterator[str]:
    rng = rng_for("words", *key)
    while True:
        for i in rng.integers(0, len(VOCABULARY), size=256):
            yield VOCABULARY[int(i)]


class TextBuilder:
    """Builds space-led texts of exactly n tokens (as `tokenizer.encode` counts them) from a key."""

    def __init__(self, tokenizer: Tokenizer, max_rounds: int = 40, salt: str = "") -> None:
        self.tokenizer = tokenizer
        self.max_rounds = max_rounds
        self.salt = salt
        self._fillers: list[str] | None = None
        self._cache: dict[tuple[int, tuple[int | str, ...]], str] = {}

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def fillers(self) -> list[str]:
        """Vocabulary words that are exactly one token with their leading space (for the last few tokens)."""
        if self._fillers is None:
            short = sorted((w for w in VOCABULARY if len(w) <= 4), key=lambda w: (len(w), w))
            self._fillers = [w for w in short[:24] if self.count(" " + w) == 1]
            if not self._fillers:
                raise ConfigError(
                    f"tokenizer {self.tokenizer.name} has no one-token words; cannot build exact prompts"
                )
        return self._fillers

    def text(self, n: int, key: Sequence[int | str]) -> str:
        """A text of exactly `n` tokens; the same key gives the same text, and a shorter n a (near) prefix of it."""
        if n < 0:
            raise ValueError(f"token count must be >= 0, got {n}")
        if n == 0:
            return ""
        if self.salt:
            key = ("salt", self.salt, *key)
        cache_key = (n, tuple(key))
        if (hit := self._cache.get(cache_key)) is not None:
            return hit
        text = self._build(n, key)
        if len(self._cache) >= 256:  # a shared prefix is asked for again and again; other texts once
            self._cache.pop(next(iter(self._cache)))
        self._cache[cache_key] = text
        return text

    def _build(self, n: int, key: Sequence[int | str]) -> str:
        stream = _words(key)
        words: list[str] = []
        count = 0
        # tokens per word, refined as we go; starts high because undershooting is cheaper. Local, so the text is a
        # function of (n, key, tokenizer) alone, whatever was built before.
        ratio = 2.0
        # grow in batches that undershoot, then trim whole words, then add one-token fillers
        for _ in range(self.max_rounds):
            remaining = n - count
            if remaining <= 4:
                break
            batch = max(1, int(remaining / ratio * 0.9))
            words.extend(next(stream) for _ in range(batch))
            count = self.count(_join(words))
            ratio = max(1.0, count / len(words))
        filler_rng = rng_for("fillers", *key)
        for _ in range(self.max_rounds):
            if count == n:
                return _join(words)
            if count > n:
                del words[-max(1, min(len(words) - 1, int((count - n) / ratio * 0.9))) :]
            else:
                fillers = self.fillers()
                picks = filler_rng.integers(0, len(fillers), size=n - count)
                words.extend(fillers[int(i)] for i in picks)
            count = self.count(_join(words))
        raise ConfigError(
            f"could not build a text of exactly {n} tokens with tokenizer {self.tokenizer.name} "
            f"(got {count}); this tokenizer merges across words"
        )


def _join(words: Sequence[str]) -> str:
    return "".join(" " + w for w in words)


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    """A prompt and its lengths: `input_tokens` is what the engine prefills (templated, special tokens included);
    `content_tokens` the tokens of the text the workload wrote; `fixed_tokens` (from `PromptBuilder.prompt`) the
    tokens before and around its fresh text: template, special tokens and any `prefix`."""

    api: Api
    messages: tuple[Message, ...]
    prompt: str
    input_tokens: int
    content_tokens: int
    fixed_tokens: int = 0


class PromptBuilder:
    """Exact-length prompts for either API. For chat, the target is the templated prompt length."""

    def __init__(self, tokenizer: Tokenizer, max_rounds: int = 6, salt: str = "") -> None:
        self.tokenizer = tokenizer
        self.texts = TextBuilder(tokenizer, salt=salt)
        self.max_rounds = max_rounds
        self._template: dict[Api, int] = {}

    def template_tokens(self, api: Api) -> int:
        """Tokens a prompt of this API has besides its text: the chat template's (system prompt, role markers) or
        the special tokens a completion gets. Every request of a run shares them, so a token-granular prefix cache
        may serve the leading part of them whatever the workload (docs/workloads.md "Expected cache share")."""
        if api not in self._template:
            one = " the"
            built = (
                self.completion([one])
                if api == "completions"
                else self.chat([{"role": "user", "content": one}])
            )
            self._template[api] = max(0, built.input_tokens - self.texts.count(one))
        return self._template[api]

    def completion(self, segments: Sequence[str]) -> BuiltPrompt:
        prompt = "".join(segments)
        return BuiltPrompt(
            "completions", (), prompt, self.tokenizer.count_prompt(prompt), self.texts.count(prompt)
        )

    def chat(self, messages: Sequence[Message]) -> BuiltPrompt:
        msgs = tuple(dict(m) for m in messages)
        content = sum(self.texts.count(m["content"]) for m in msgs)
        return BuiltPrompt("chat", msgs, "", self.tokenizer.count_chat(msgs), content)

    def prompt(
        self,
        target: int,
        api: Api,
        key: Sequence[int | str],
        *,
        before: Sequence[Message] = (),
        prefix: str = "",
    ) -> BuiltPrompt:
        """A prompt of `target` prefilled tokens whose last part is a fresh text keyed by `key`.

        Completions: `prefix` + text. Chat: `before` messages + a user message (`prefix` + text). The fresh text's
        length is adjusted until the whole measures exactly `target`; if a template makes that impossible, the
        closest achievable prompt is returned and its true length recorded.
        """

        def build(k: int) -> BuiltPrompt:
            text = prefix + self.texts.text(k, key)
            if api == "completions":
                return self.completion([text])
            return self.chat([*before, {"role": "user", "content": text}])

        probe = build(1)
        fixed = probe.input_tokens - 1
        k = target - fixed
        if k < 1:
            raise ConfigError(
                f"a prompt of {target} tokens is impossible: the fixed part already takes {fixed} "
                f"tokens ({api} template, prefix); raise the length"
            )
        return replace(self._fit(build, target, k), fixed_tokens=fixed)

    def _fit(self, build: Callable[[int], BuiltPrompt], target: int, k: int) -> BuiltPrompt:
        best = build(k)
        for _ in range(self.max_rounds):
            if best.input_tokens == target:
                return best
            k = max(1, k + target - best.input_tokens)
            candidate = build(k)
            if abs(candidate.input_tokens - target) >= abs(best.input_tokens - target):
                break
            best = candidate
        # the boundary with what follows (a template's end) merges differently per last word: look around
        for delta in (1, -1, 2, -2, 3, -3):
            if k + delta >= 1 and (candidate := build(k + delta)).input_tokens == target:
                return candidate
        return best


def tags_of(items: Mapping[str, object]) -> dict[str, str]:
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in items.items()}
