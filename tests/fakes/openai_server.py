"""A plain OpenAI-compatible streaming server on loopback: what a proxy, a hosted API or an unidentified engine shows.

It has `GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions` (streamed or not) and nothing else:
no `/tokenize`, `/health`, `/version` or `/metrics`. Like OpenAI's own API it refuses a body field the API does not
define with HTTP 400 ("Unrecognized request argument supplied: ..."), so a client that sends engine-only fields
(`ignore_eos`, `min_tokens`) fails against it. Its usage counts prompt tokens with the `count_prompt` /
`count_chat` it is given (a real tokenizer in the tests that check exact lengths), and every answer is
`max_tokens` tokens of `TOKEN`. Every request body it accepted or refused is kept in `bodies`.

    with OpenAIServer(count_prompt=...) as srv:   # serves on srv.url (an ephemeral port) from its own thread
        ...
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

__all__ = ["OPENAI_FIELDS", "TOKEN", "OpenAIServer"]

TOKEN = " tok"
# the request fields of the OpenAI Chat Completions and Completions APIs (platform.openai.com/docs/api-reference)
OPENAI_FIELDS = frozenset(
    {
        "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
        "stream", "stream_options", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
        "top_logprobs", "user", "seed", "echo", "best_of", "suffix", "response_format", "tools", "tool_choice",
        "parallel_tool_calls", "service_tier", "store", "metadata", "modalities", "reasoning_effort",
        "prediction", "audio",
    }
)  # fmt: skip

Messages = Sequence[Mapping[str, str]]


def _quarter_chars(text: str) -> int:
    """A model's count it does not tell: one token per 4 characters (rounded up)."""
    return -(-len(text) // 4)


def _quarter_chars_chat(messages: Messages) -> int:
    return sum(_quarter_chars(str(m.get("content", ""))) + 4 for m in messages)


class OpenAIServer:
    def __init__(
        self,
        *,
        model: str = "some-model",
        owned_by: str = "organization-owner",
        count_prompt: Callable[[str], int] = _quarter_chars,
        count_chat: Callable[[Messages], int] = _quarter_chars_chat,
        itl_s: float = 0.001,
        accept: frozenset[str] = frozenset(),
        api_key: str | None = None,
        also_serves: tuple[str, ...] = (),
    ) -> None:
        """`accept`: body fields taken besides OpenAI's (an engine's own, e.g. `ignore_eos` behind a proxy);
        `api_key`: every route answers 401 without `Authorization: Bearer <api_key>`, as a hosted API does."""
        self.api_key = api_key
        self.also_serves = also_serves  # more model ids /v1/models lists after `model` (a multi-model server)
        self.unauthorized: list[str] = []  # paths asked without the key
        self.model, self.owned_by, self.itl_s = model, owned_by, itl_s
        self.fields = OPENAI_FIELDS | accept
        self.count_prompt, self.count_chat = count_prompt, count_chat
        self.bodies: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.counted: list[int] = []  # the prompt tokens of every answered request, as its usage said
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> OpenAIServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- routes ----------------------------------------------------------------------------------------------
    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            self.unauthorized.append(request.path)
            error = {"message": "Incorrect API key provided", "type": "invalid_request_error"}
            return web.json_response({"error": error}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def _models(self, request: web.Request) -> web.Response:
        cards = [
            {"id": m, "object": "model", "created": 0, "owned_by": self.owned_by}
            for m in (self.model, *self.also_serves)
        ]
        return web.json_response({"object": "list", "data": cards})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        unknown = sorted(set(body) - self.fields)
        if unknown:
            self.refused.extend(unknown)
            error = {
                "message": f"Unrecognized request argument supplied: {unknown[0]}",
                "type": "invalid_request_error",
            }
            return web.json_response({"error": error}, status=400)
        chat = request.path.endswith("/chat/completions")
        # in a thread: a counter may run a tokenizer program (llama-tokenize)
        if chat:
            prompt = await asyncio.to_thread(self.count_chat, body["messages"])
        else:
            prompt = await asyncio.to_thread(self.count_prompt, body["prompt"])
        self.counted.append(prompt)
        n = int(body.get("max_tokens") or 16)
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            if chat:
                choice["message"] = {"role": "assistant", "content": TOKEN * n}
            else:
                choice["text"] = TOKEN * n
            return web.json_response(
                {"id": "x", "object": kind, "model": self.model, "choices": [choice], "usage": usage}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def event(obj: Mapping[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        for i in range(n):
            await asyncio.sleep(self.itl_s)
            fin = "length" if i == n - 1 else None
            part: dict[str, Any] = {"index": 0, "finish_reason": fin}
            if chat:
                part["delta"] = {"content": TOKEN}
            else:
                part["text"] = TOKEN
            await event({"id": "x", "object": chunk_kind, "model": self.model, "choices": [part]})
        if (body.get("stream_options") or {}).get("include_usage"):
            await event({"id": "x", "object": chunk_kind, "model": self.model, "choices": [], "usage": usage})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
