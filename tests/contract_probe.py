"""Runs inside an engine's own environment (not EngineBench's): parse argv with the engine's argument parser,
validate request bodies with its protocol classes, build its config models. Imports nothing from EngineBench.

Invoked by `tests/contract_env.py` as `python contract_probe.py` with a JSON list of [op, args] calls on stdin; prints one line `RESULT <json>`.
Modules the engine imports that are not installed in this environment are replaced by inert stubs (module objects
whose attributes are falsy placeholders) *only* so that the parser / protocol module can be imported; each stubbed
name is reported in the result (`stubbed`), and nothing the checks rely on comes from a stub.
"""

from __future__ import annotations

import abc
import argparse
import importlib
import importlib.abc
import importlib.machinery
import json
import sys
import types
from typing import Any

STUBBED: set[str] = set()


def _placeholder(name: str) -> type:
    def _attr(self: object, attr: str) -> object:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _placeholder(attr)()

    return _Meta(
        name,
        (),
        {
            "__init__": lambda self, *a, **k: None,
            "__call__": lambda self, *a, **k: _placeholder("result")(),
            "__getattr__": _attr,
            "__bool__": lambda self: False,
            "__iter__": lambda self: iter(()),
            "__len__": lambda self: 0,
            "__contains__": lambda self, item: False,
        },
    )


class _Meta(abc.ABCMeta):
    def __getattr__(cls, attr: str) -> object:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _placeholder(attr)

    def __getitem__(cls, item: object) -> type:
        return cls

    def __or__(cls, other: object) -> type:
        return cls

    def __ror__(cls, other: object) -> type:
        return cls


class _StubModule(types.ModuleType):
    __version__ = "0.0.0"

    def __getattr__(self, attr: str) -> object:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _placeholder(attr)


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, name: str, path: object, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


sys.meta_path.insert(0, _StubFinder())


def load(module: str) -> Any:
    """Import `module`, stubbing each top-level package it needs that is not installed (never its own package)."""
    own = module.split(".")[0]
    for _ in range(100):
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if not top or top == own or top in STUBBED:
                raise
            STUBBED.add(top)
            for name in [n for n in sys.modules if n == own or n.startswith(own + ".")]:
                del sys.modules[name]
    raise RuntimeError(f"{module}: too many missing modules")


def _namespace(args: argparse.Namespace, dests: list[str]) -> dict[str, Any]:
    out = {}
    for dest in dests:
        value = getattr(args, dest, "<missing>")
        out[dest] = value if isinstance(value, (str, int, float, bool, type(None), list)) else repr(value)
    return out


def _parse(parser: argparse.ArgumentParser, argv: list[str], dests: list[str]) -> dict[str, Any]:
    """Parse with the engine's parser; a refusal (its `error`, from the parser or a subparser) is returned."""
    errors: list[str] = []

    def error(self: argparse.ArgumentParser, message: str) -> None:
        errors.append(message)
        raise SystemExit(2)

    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error  # type: ignore[method-assign,assignment]
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        return {"error": errors[0] if errors else "exit"}
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]
    return {"values": _namespace(args, dests)}


def _fields_check(model: Any, body: dict[str, Any]) -> dict[str, Any]:
    """Validate `body` with the pydantic model; keys that are no declared field (extra="allow"/"ignore" would
    swallow them silently) are reported as unknown."""
    fields = set(model.model_fields)
    aliases = {f.alias for f in model.model_fields.values() if f.alias}
    unknown = sorted(k for k in body if k not in fields and k not in aliases)
    try:
        model.model_validate(body)
    except Exception as e:  # pydantic.ValidationError: the engine would answer 400
        return {
            "unknown": unknown,
            "error": str(e).splitlines()[0] + " " + " | ".join(str(e).splitlines()[1:4]),
        }
    return {"unknown": unknown, "error": None}


# ---------------------------------------------------------------------------------------------------- engines


def sglang_args(argv: list[str], dests: list[str]) -> dict[str, Any]:
    server_args = load("sglang.srt.server_args")
    parser = argparse.ArgumentParser()
    server_args.ServerArgs.add_cli_args(parser)
    return _parse(parser, argv, dests)


def sglang_body(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    protocol = load("sglang.srt.entrypoints.openai.protocol")
    model = protocol.ChatCompletionRequest if kind == "chat" else protocol.CompletionRequest
    return _fields_check(model, body)


_PARSERS: dict[str, argparse.ArgumentParser] = {}


def lmdeploy_args(argv: list[str], dests: list[str]) -> dict[str, Any]:
    """The parser `lmdeploy` builds in lmdeploy/cli/entrypoint.py `run()` (its subparsers can be added once)."""
    if "lmdeploy" not in _PARSERS:
        cli = load("lmdeploy.cli.cli")
        serve = load("lmdeploy.cli.serve")
        cli.CLI.add_parsers()
        serve.SubCliServe.add_parsers()
        _PARSERS["lmdeploy"] = cli.CLI.parser
    return _parse(_PARSERS["lmdeploy"], argv, dests)


def lmdeploy_body(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    protocol = load("lmdeploy.serve.openai.protocol")
    model = protocol.ChatCompletionRequest if kind == "chat" else protocol.CompletionRequest
    return _fields_check(model, body)


def vllm_args(argv: list[str], dests: list[str]) -> dict[str, Any]:
    cli_args = load("vllm.entrypoints.launchers.cli_args")
    argparse_utils = load("vllm.utils.argparse_utils")
    parser = cli_args.make_arg_parser(argparse_utils.FlexibleArgumentParser())
    return _parse(parser, argv, dests)


def vllm_body(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    if kind == "chat":
        model = load("vllm.entrypoints.openai.chat_completion.protocol").ChatCompletionRequest
    else:
        model = load("vllm.entrypoints.openai.completion.protocol").CompletionRequest
    return _fields_check(model, body)


def vllm_engine_fields() -> list[str]:
    """The fields of vLLM's AsyncEngineArgs: what Ray Serve LLM's engine_kwargs and Triton's model.json may hold."""
    import dataclasses

    arg_utils = load("vllm.engine.arg_utils")
    return sorted(f.name for f in dataclasses.fields(arg_utils.AsyncEngineArgs))


def vllm_sanitized(names: list[str]) -> dict[str, Any]:
    """vLLM's metric names as its Ray wrappers export them (`_get_sanitized_opentelemetry_name`)."""
    ray_wrappers = load("vllm.v1.metrics.ray_wrappers")
    sanitize = ray_wrappers.RayPrometheusMetric._get_sanitized_opentelemetry_name
    return {name: sanitize(name) for name in names}


def mii_deepspeed(config_utils: str) -> None:
    """MII's config models derive from deepspeed's DeepSpeedConfigModel (a pydantic BaseModel): load that one file
    from the deepspeed sdist as `deepspeed.runtime.config_utils`, the rest of deepspeed stays stubbed."""
    import importlib.util
    import logging

    STUBBED.add("deepspeed")
    utils = _StubModule("deepspeed.utils")
    utils.__path__ = []  # a package: its other submodules stay stubs
    utils.logger = logging.getLogger("deepspeed")  # type: ignore[attr-defined]
    sys.modules["deepspeed.utils"] = utils
    spec = importlib.util.spec_from_file_location("deepspeed.runtime.config_utils", config_utils)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["deepspeed.runtime.config_utils"] = module
    spec.loader.exec_module(module)


def mii_args(argv: list[str], dests: list[str], source: str) -> dict[str, Any]:
    """MII builds its parser under `if __name__ == "__main__"`: run exactly those lines of its own file."""
    text = open(source, encoding="utf-8").read()
    start = text.index("    parser = argparse.ArgumentParser(")
    end = text.index("    args = parser.parse_args()", start)
    block = "\n".join(line[4:] for line in text[start:end].splitlines())
    scope: dict[str, Any] = {"argparse": argparse, "json": json}  # the modules that block uses
    exec(compile(block, source, "exec"), scope)
    return _parse(scope["parser"], argv, dests)


def mii_body(kind: str, body: dict[str, Any], prompt_tokens: int, max_length: int) -> dict[str, Any]:
    """The request model, then GenerateParamsConfig built the way mii/entrypoints/openai_api_server.py builds it
    (generate_args: ignore_eos False, do_sample True, then min_tokens / max_tokens / top_p / temperature when set),
    then MII's own Request stop logic (mii/batching/data_classes.py) run token by token with EOS on every step."""
    models = load("mii.entrypoints.data_models")
    model = models.ChatCompletionRequest if kind == "chat" else models.CompletionRequest
    out = _fields_check(model, body)
    if out["error"]:
        return out
    request = model.model_validate(body)
    generate_args: dict[str, Any] = {"ignore_eos": False, "do_sample": True, "return_full_text": False}
    if request.min_tokens is not None:
        generate_args["min_new_tokens"] = request.min_tokens
    if request.max_tokens is not None:
        generate_args["max_new_tokens"] = request.max_tokens
    if request.top_p is not None:
        generate_args["top_p"] = request.top_p
    if request.temperature is not None:
        generate_args["temperature"] = request.temperature
    config = load("mii.config")
    try:
        params = config.GenerateParamsConfig(
            prompt_length=prompt_tokens, max_length=max_length, **generate_args
        )
    except Exception as e:
        return {
            **out,
            "error": f"GenerateParamsConfig: {str(e).splitlines()[0]} {' | '.join(str(e).splitlines()[1:3])}",
        }
    data_classes = load("mii.batching.data_classes")
    req = data_classes.Request(
        tid=0, uid=0, input_tokens=None, prompt_tokens=list(range(prompt_tokens)), seq_length=prompt_tokens,
        last_in_prompt=True, post_processing=[], generate_params=params,
    )  # fmt: skip
    while True:
        req.is_done = True  # the model produced EOS at every step
        if req.stop_generation:
            break
        req.seq_length += 1
    return {**out, "generated": req.num_generated_tokens, "finish": str(req.finish_reason)}


def ray_config(llm_config: dict[str, Any]) -> dict[str, Any]:
    configs = load("ray.llm._internal.serve.core.configs.llm_config")
    try:
        cfg = configs.LLMConfig(**llm_config)
    except Exception as e:
        return {"error": str(e).splitlines()[0] + " " + " | ".join(str(e).splitlines()[1:4])}
    server = load("ray.llm._internal.serve.core.server.llm_server")
    interval = server.LLMServer._get_batch_interval_ms(types.SimpleNamespace(_llm_config=cfg))
    return {
        "error": None,
        "engine_kwargs": cfg.engine_kwargs,
        "experimental_configs": cfg.experimental_configs,
        "batch_interval_ms": interval,
        "log_engine_metrics": cfg.log_engine_metrics,
    }


def ray_body(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """Ray Serve LLM's own request models (they subclass vLLM's, core/configs/openai_api_models.py)."""
    models = load("ray.llm._internal.serve.core.configs.openai_api_models")
    return _fields_check(models.ChatCompletionRequest if kind == "chat" else models.CompletionRequest, body)


OPS = {
    "sglang_args": sglang_args,
    "sglang_body": sglang_body,
    "lmdeploy_args": lmdeploy_args,
    "lmdeploy_body": lmdeploy_body,
    "vllm_args": vllm_args,
    "vllm_body": vllm_body,
    "vllm_sanitized": vllm_sanitized,
    "vllm_engine_fields": vllm_engine_fields,
    "mii_deepspeed": mii_deepspeed,
    "mii_args": mii_args,
    "mii_body": mii_body,
    "ray_config": ray_config,
    "ray_body": ray_body,
}
# the engine's own top-level package per op: never stubbed
OWN = {"sglang": "sglang", "lmdeploy": "lmdeploy", "vllm": "vllm", "mii": "mii", "ray": "ray"}


def run(op: str, call: list[Any]) -> Any:
    """One call; a module missing at call time (an import inside the parser builder) is stubbed and the call rerun."""
    own = OWN[op.split("_")[0]]
    for _ in range(100):
        try:
            return OPS[op](*call)
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if not top or top == own or top in STUBBED:
                raise
            STUBBED.add(top)
            for name in [n for n in sys.modules if n == own or n.startswith(own + ".")]:
                del sys.modules[name]
    raise RuntimeError(f"{op}: too many missing modules")


if __name__ == "__main__":
    calls = json.loads(sys.stdin.read())
    results = [run(op, args) for op, args in calls]
    print("RESULT " + json.dumps({"results": results, "stubbed": sorted(STUBBED)}, default=repr))
