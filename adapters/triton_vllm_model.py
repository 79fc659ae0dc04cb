"""Triton python-backend model serving vLLM (CPU build) with the contract of Triton's own vLLM backend.

Not an adapter: this file is copied as `model.py` into the model repository that `adapters.triton_native` writes, and
runs inside Triton's python backend stub (`triton_python_backend_stub`, Python 3.11), whose interpreter takes the
vLLM CPU environment's packages. Nothing here runs in EngineBench's own process; the imports of
`triton_python_backend_utils`, numpy and vllm happen in `initialize`, so importing this module elsewhere is harmless.

The contract is that of triton-inference-server/vllm_backend (src/model.py and src/utils/request.py, commit
8de0c148, 2026-01-09): inputs `text_input` (the prompt, chat template already applied by the client), optional
`stream` (bool) and `sampling_parameters` (a JSON object of vLLM `SamplingParams` fields: `max_tokens`,
`min_tokens`, `ignore_eos`, `temperature`, ...); output `text_output`, the new text only when streaming. The model is
decoupled: when streaming, one response per engine step that produced output, which on vLLM's CPU build is one new
token per response; the last response carries the FINAL flag. Of the backend's additional outputs it has
`return_finish_reason` -> `finish_reason`, `return_num_input_tokens` -> `num_input_tokens` and
`return_num_output_tokens` -> `num_output_tokens` (the new tokens of each response), and `exclude_input_in_output`
(a non-streamed answer starts with the prompt unless it is true). Engine arguments come from `model.json` beside this
file (vLLM `AsyncEngineArgs` fields), as in the vLLM backend. Not here: LoRA, images, logprobs, embeddings and the
custom `vllm:*` metrics (Triton's own `nv_inference_*` counters still count every request).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import locale
import os
import queue
import threading
import uuid
from typing import Any

_ENGINE_ARGS_FILE = "model.json"
# the optional boolean inputs read as flags (the vLLM backend's names)
_FLAGS = ("stream", "return_finish_reason", "return_num_input_tokens", "return_num_output_tokens")
# numeric and boolean SamplingParams fields the request may set, with the type each is read as
_PARAM_TYPES: dict[str, type] = {
    "n": int,
    "best_of": int,
    "presence_penalty": float,
    "frequency_penalty": float,
    "repetition_penalty": float,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "seed": int,
    "ignore_eos": bool,
    "max_tokens": int,
    "min_tokens": int,
    "skip_special_tokens": bool,
}


def _read_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def sampling_fields(raw: str) -> dict[str, Any]:
    """The `sampling_parameters` JSON as SamplingParams keyword arguments (numbers sent as strings converted, as the
    vLLM backend's `TritonSamplingParams.from_dict` does); unknown fields are refused with their name."""
    params = json.loads(raw) if raw else {}
    if not isinstance(params, dict):
        raise ValueError("sampling_parameters must be a JSON object")
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == "stop":
            out["stop"] = [value] if isinstance(value, str) else list(value)
            continue
        kind = _PARAM_TYPES.get(key)
        if kind is None:
            raise ValueError(
                f"sampling_parameters: unknown field {key!r}; known: {', '.join(sorted(_PARAM_TYPES))}"
            )
        out[key] = _read_bool(value) if kind is bool else kind(value)
    return out


class TritonPythonModel:
    """One vLLM AsyncLLM per model instance, on an asyncio loop in its own thread; responses sent from another."""

    @staticmethod
    def auto_complete_config(auto_complete_model_config: Any) -> Any:
        return auto_complete_model_config

    def initialize(self, args: dict[str, Any]) -> None:
        # The stub embeds Python without setting the locale from the environment: files would be read as ASCII
        # (torch reads UTF-8 templates at import). Python's UTF-8 mode is not set by PYTHONUTF8 in an isolated
        # embedded interpreter, so the C locale's codeset is changed here, before anything opens a file.
        with contextlib.suppress(locale.Error):
            locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        import numpy as np
        import triton_python_backend_utils as pb_utils
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.np, self.pb = np, pb_utils
        self.model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException("this model must be decoupled (model_transaction_policy)")
        model_dir = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(model_dir, _ENGINE_ARGS_FILE)) as fh:
            engine_args = AsyncEngineArgs(**json.load(fh))
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, name="vllm-loop", daemon=True)
        self.loop_thread.start()
        self.engine = asyncio.run_coroutine_threadsafe(self._start(AsyncLLM, engine_args), self.loop).result()
        self.responses: queue.Queue[Any] = queue.Queue()
        self.cancelled: set[str] = set()
        self.sender_thread = threading.Thread(target=self._send_loop, name="responses", daemon=True)
        self.sender_thread.start()

    async def _start(self, engine_cls: Any, engine_args: Any) -> Any:
        return engine_cls.from_engine_args(engine_args)

    def _send_loop(self) -> None:
        # send() waits on the stub's IPC with the server; kept off the engine's loop so vLLM keeps stepping
        while (item := self.responses.get()) is not None:
            request_id, sender, response, flags = item
            try:
                sender.send(response, flags=flags)
                if (
                    not flags and sender.is_cancelled()
                ):  # the client went away: the generator aborts the request
                    self.cancelled.add(request_id)
            except Exception as exc:
                self.pb.Logger.log_warn(f"sending a response failed: {exc}")

    def execute(self, requests: list[Any]) -> None:
        # inputs are read here, on the stub's thread, while the request's tensors are certainly alive: read later
        # from the engine's loop, a BYTES input was seen to hold garbage (python backend of Triton 2.51)
        pb = self.pb
        for request in requests:
            sender = request.get_response_sender()
            try:
                call = self._inputs(request)
            except Exception as exc:
                error = pb.InferenceResponse(output_tensors=[], error=pb.TritonError(f"bad request: {exc}"))
                sender.send(error, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            asyncio.run_coroutine_threadsafe(self._generate(sender, *call), self.loop)
        return None

    def _inputs(self, request: Any) -> tuple[str, dict[str, bool], dict[str, Any]]:
        pb = self.pb

        def first(name: str) -> Any:
            tensor = pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy().reshape(-1)[0]

        prompt = first("text_input")
        prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
        flags = {name: bool(first(name)) for name in _FLAGS}
        exclude = first("exclude_input_in_output")
        flags["prepend_input"] = not flags["stream"] if exclude is None else not bool(exclude)
        raw = first("sampling_parameters")
        raw = request.parameters() if raw is None else raw
        return prompt, flags, sampling_fields(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))

    def _response(self, flags: dict[str, bool], text: str, out: Any, new: int) -> Any:
        np, pb = self.np, self.pb
        tensors = [pb.Tensor("text_output", np.asarray([text.encode("utf-8")], dtype=np.object_))]
        if flags["return_finish_reason"]:
            reason = str(out.outputs[0].finish_reason)  # "None" until the last, as in the vLLM backend
            tensors.append(pb.Tensor("finish_reason", np.asarray([reason.encode()], dtype=np.object_)))
        if flags["return_num_input_tokens"]:
            tensors.append(
                pb.Tensor("num_input_tokens", np.asarray([len(out.prompt_token_ids or ())], np.uint32))
            )
        if flags["return_num_output_tokens"]:
            tensors.append(pb.Tensor("num_output_tokens", np.asarray([new], dtype=np.uint32)))
        return pb.InferenceResponse(output_tensors=tensors)

    async def _generate(
        self, sender: Any, prompt: str, flags: dict[str, bool], fields: dict[str, Any]
    ) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        request_id = uuid.uuid4().hex
        stream = flags["stream"]
        try:
            kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
            params = SamplingParams(**fields, output_kind=kind)
            async for out in self.engine.generate(prompt, params, request_id):
                if request_id in self.cancelled:
                    self.cancelled.discard(request_id)
                    await self.engine.abort(request_id)
                    self.responses.put((request_id, sender, None, final))
                    return
                piece = out.outputs[0]
                if stream and (piece.token_ids or out.finished):
                    response = self._response(flags, piece.text, out, len(piece.token_ids))
                    self.responses.put((request_id, sender, response, final if out.finished else 0))
                elif not stream and out.finished:
                    text = prompt + piece.text if flags["prepend_input"] else piece.text
                    response = self._response(flags, text, out, len(piece.token_ids))
                    self.responses.put((request_id, sender, response, final))
        except Exception as exc:
            error = pb.InferenceResponse(
                output_tensors=[], error=pb.TritonError(f"vLLM generate failed: {exc}")
            )
            self.responses.put((request_id, sender, error, final))

    def finalize(self) -> None:
        self.responses.put(None)
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
