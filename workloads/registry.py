"""Workloads by name or path: loading and validating workload files, fingerprints, and generation dispatch.

A `Workload` is a validated spec plus where it came from. Its fingerprint is sha256 over the canonical JSON of its
parameters (seed included), the generator version of its kind and, for trace replay, the trace file's content hash:
results of different fingerprints are never compared. `Workload.fingerprint` uses the file's `seed`;
`fingerprint_for(seed)` gives the fingerprint of a run with another seed, which `generate(n, seed=...)` produces.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, cast

import yaml
from pydantic import ValidationError

from harness.errors import ConfigError
from workloads.model import DIST_KINDS, WORKLOAD_KINDS, BaseWorkloadSpec, QuantizedSpec, TraceSpec
from workloads.spec import RequestSpec
from workloads.tokenizer import Tokenizer

__all__ = ["Workload", "builtin_names", "fingerprint_of", "list_workloads", "load_workload", "parse_workload"]

# kind -> module that generates it; each has GENERATOR_VERSION, generate(workload, n, seed, tokenizer, prompts) and
# requests(workload, seed, tokenizer, prompts) (an iterator of the same requests)
_GENERATORS = {
    "synthetic": "workloads.synthetic",
    "chat": "workloads.chat",
    "long-context": "workloads.long_context",
    "shared-prefix": "workloads.shared_prefix",
    "quantized": "workloads.quantized",
    "trace": "workloads.traces",
}
_REPO_ROOT = Path(__file__).resolve().parent.parent
_BUILTIN = Path(__file__).resolve().parent / "builtin"  # package data (pyproject: workloads/builtin/*.yaml)


def _generator(kind: str) -> Any:
    return importlib.import_module(_GENERATORS[kind])


@dataclass(frozen=True)
class Workload:
    """A validated workload. `base_dir` anchors relative paths in it (the file's folder; the repo for built-ins)."""

    params: BaseWorkloadSpec
    source: str  # "builtin:NAME" or the file path
    base_dir: Path

    @property
    def name(self) -> str:
        return self.params.name

    @property
    def kind(self) -> str:
        return self.params.kind

    @property
    def version(self) -> int:
        return self.params.version

    @property
    def description(self) -> str:
        return self.params.description

    @property
    def seed(self) -> int:
        return self.params.seed

    @property
    def fingerprint(self) -> str:
        return self.fingerprint_for(self.params.seed)

    def fingerprint_for(self, seed: int) -> str:
        return fingerprint_of(self, seed)

    def resolve_path(self, path: str) -> Path:
        """A path from the workload file: absolute, or relative to the file's folder, the repo, or the cwd."""
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        for base in (self.base_dir, _REPO_ROOT, Path.cwd()):
            if (base / p).exists():
                return (base / p).resolve()
        return (self.base_dir / p).resolve()

    def generate(
        self, n: int, seed: int | None = None, tokenizer: Tokenizer | None = None, prompts: str = ""
    ) -> list[RequestSpec]:
        """The first `n` requests for `seed` (default: the file's), lengths measured with `tokenizer` (required:
        the served model's). Deterministic, and prefix-stable: the first k requests of generate(n) are those of
        generate(k). Trace replay returns fewer when the trace has fewer rows. `prompts` is the run's prompt key
        (`workloads.text`): the seed fixes the distribution (lengths, sessions, arrivals), the key the words."""
        if n < 0:
            raise ConfigError(f"request count must be >= 0, got {n}")
        fn = cast(Callable[..., list[RequestSpec]], _generator(self.kind).generate)
        return fn(self, n, self.seed if seed is None else seed, self._tokenizer(tokenizer), prompts)

    def requests(
        self, seed: int | None = None, tokenizer: Tokenizer | None = None, prompts: str = ""
    ) -> Iterator[RequestSpec]:
        """The same requests as `generate`, one at a time and without end (a trace: until its rows run out), for
        a supply that builds them ahead of need (`harness.supply`)."""
        fn = cast(Callable[..., Iterator[RequestSpec]], _generator(self.kind).requests)
        return fn(self, self.seed if seed is None else seed, self._tokenizer(tokenizer), prompts)

    def _tokenizer(self, tokenizer: Tokenizer | None) -> Tokenizer:
        if tokenizer is None:
            raise ConfigError(f"workload {self.name}: generating requests needs the served model's tokenizer")
        return tokenizer

    def with_overrides(self, overrides: Mapping[str, Any]) -> Workload:
        """The same workload with some parameters changed (dotted keys reach into nested ones: `turns.mean`)."""
        data = self.params.model_dump(mode="json")
        _apply(data, overrides)
        name = self.source.removeprefix("builtin:")
        label = f"{Path(name).name}{'.yaml' if self.source.startswith('builtin:') else ''} (with overrides)"
        return Workload(_validate(data, label), self.source, self.base_dir)


def _apply(data: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[leaf] = value


def fingerprint_of(workload: Workload, seed: int) -> str:
    params = workload.params.model_dump(mode="json")
    params["seed"] = seed
    material: dict[str, Any] = {
        "params": params,
        "generator": {workload.kind: _generator(workload.kind).GENERATOR_VERSION},
    }
    spec = workload.params
    if isinstance(spec, QuantizedSpec):
        material["generator"][spec.base.kind] = _generator(spec.base.kind).GENERATOR_VERSION
        spec = spec.base
    if isinstance(spec, TraceSpec):
        # the trace's content, not where it happens to lie
        params_trace = material["params"] if spec is workload.params else material["params"]["base"]
        params_trace.pop("trace_path", None)
        material["trace_sha256"] = _file_sha256(workload.resolve_path(spec.trace_path))
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(
            f"trace file {path} not found: set trace_path in the workload (or --set trace_path=...)"
        )
    return _sha256_cached(str(path), path.stat().st_mtime_ns, path.stat().st_size)


@cache
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- loading

_TAGS = frozenset(DIST_KINDS) | frozenset(WORKLOAD_KINDS)


def _describe_error(err: Mapping[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    kind = err.get("type", "")
    bounds = {
        "greater_than": ("gt", ">"),
        "greater_than_equal": ("ge", ">="),
        "less_than": ("lt", "<"),
        "less_than_equal": ("le", "<="),
    }
    if kind in bounds:
        key, op = bounds[kind]
        bound = ctx.get(key)
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"must be {op} {bound} (got {err.get('input')!r})"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field (check the spelling; see docs/workloads.md)"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {err.get('input')!r})"
    if kind == "union_tag_invalid":
        return f"must be one of {ctx.get('expected_tags')} (got {ctx.get('tag')!r})"
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def _field_of(loc: Sequence[Any]) -> str:
    # discriminated unions put the tag in the location (turns.geometric.mean); users wrote turns.mean
    parts = [str(p) for p in loc if not (isinstance(p, str) and p in _TAGS)]
    return ".".join(parts) or "(top level)"


def _validate(data: Any, label: str) -> BaseWorkloadSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"workload {label}: expected a mapping of fields, got {type(data).__name__}")
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in WORKLOAD_KINDS:
        raise ConfigError(
            f"workload {label}: field `kind`: must be one of {sorted(WORKLOAD_KINDS)} (got {kind!r})"
        )
    try:
        return WORKLOAD_KINDS[kind].model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        more = (
            f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
            if len(errors) > 1
            else ""
        )
        raise ConfigError(
            f"workload {label}: field `{_field_of(first['loc'])}`: {_describe_error(first)}{more}"
        ) from None


def parse_workload(text: str, label: str, base_dir: Path, source: str | None = None) -> Workload:
    """Validate workload YAML text. `label` names the file in error messages."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"workload {label}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if isinstance(data, dict) and data.get("kind") == "quantized" and isinstance(data.get("base"), str):
        data = {**data, "base": _load_data(data["base"], base_dir)}
    return Workload(_validate(data, label), source or label, base_dir)


def _load_data(name_or_path: str, base_dir: Path) -> Any:
    w = load_workload(name_or_path if name_or_path in builtin_names() else str(base_dir / name_or_path))
    return w.params.model_dump(mode="json")


def builtin_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _BUILTIN.glob("*.yaml"))


def load_workload(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> Workload:
    """A built-in workload by name (see `builtin_names()`), or a YAML file by path."""
    if name_or_path in builtin_names():
        resource = _BUILTIN / f"{name_or_path}.yaml"
        w = parse_workload(
            resource.read_text(), f"{name_or_path}.yaml", _REPO_ROOT, f"builtin:{name_or_path}"
        )
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"workload {name_or_path!r} is neither a built-in ({', '.join(builtin_names())}) nor a file"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"workload {path.name}: not UTF-8 text (byte {e.start}); save it as UTF-8 YAML"
            ) from None
        w = parse_workload(text, path.name, path.resolve().parent, str(path))
    return w.with_overrides(overrides) if overrides else w


def list_workloads() -> list[Workload]:
    return [load_workload(name) for name in builtin_names()]
