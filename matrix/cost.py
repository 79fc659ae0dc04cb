"""Money: a price table of instances (user-editable, each price dated and sourced) and what a capacity costs.

$/month = replicas × $/hour × hours_per_month (730 by default). Per-token prices are at the sustained capacity of
one replica: $/1M output tokens charges the whole instance-hour to output tokens (the usual serving convention),
$/1M input tokens likewise to input tokens, and $/1M tokens divides it over both. They are three views of one
cost, not parts to be added.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from harness.errors import ConfigError, SchemaError
from matrix.capacity import Capacity

__all__ = [
    "PRICES_SCHEMA_VERSION",
    "Cost",
    "HostShape",
    "Instance",
    "InstanceChoice",
    "PriceTable",
    "choose_instance",
    "cost_of",
    "normalize_arch",
    "parse_prices",
]

__all__ += ["EnergyCost", "EnergyPrice", "energy_cost", "energy_price"]

PRICES_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Instance:
    name: str
    platform: str  # "cpu" | "nvidia" | "amd"
    usd_per_hour: float
    source: str
    date: str
    accelerator: str = ""
    accelerators: int = 0
    pricing: str = "on-demand"
    note: str = ""
    arch: str = ""  # "x86_64" | "arm64" (normalize_arch); "" = not stated
    vcpus: int = 0  # 0 = not stated
    memory_gib: float = 0.0
    cpu_vendor: str = ""  # "amd" | "intel" | "aws" ...


@dataclass(frozen=True, slots=True)
class PriceTable:
    instances: Mapping[str, Instance]
    defaults: Mapping[str, str]  # platform → instance name used to price runs measured on that platform
    hours_per_month: float = 730.0
    origin: str = "builtin"

    def for_platform(self, platform: str, override: str | None = None) -> Instance:
        name = override or self.defaults.get(platform)
        if name is None:
            raise ConfigError(
                f"price table {self.origin} has no default instance for platform {platform!r}; "
                "add one under `defaults:` or pass --instance"
            )
        if name not in self.instances:
            raise ConfigError(
                f"instance {name!r} is not in price table {self.origin}; known: {', '.join(self.instances)}"
            )
        return self.instances[name]


def parse_prices(data: Any, origin: str = "builtin") -> PriceTable:
    if not isinstance(data, Mapping) or data.get("schema_version") != PRICES_SCHEMA_VERSION:
        got = data.get("schema_version") if isinstance(data, Mapping) else None
        raise SchemaError(
            f"price table {origin} has schema_version {got!r}; this EngineBench reads {PRICES_SCHEMA_VERSION}"
        )
    raw = data.get("instances")
    if not isinstance(raw, Mapping) or not raw:
        raise SchemaError(f"price table {origin} needs a non-empty `instances` mapping")
    instances: dict[str, Instance] = {}
    for name, entry in raw.items():
        if not isinstance(entry, Mapping):
            raise ConfigError(f"price table {origin}: instance {name} must be a mapping")
        missing = [k for k in ("platform", "usd_per_hour", "source", "date") if entry.get(k) in (None, "")]
        if missing:
            raise ConfigError(f"price table {origin}: instance {name} lacks {', '.join(missing)}")
        price = entry["usd_per_hour"]
        if not isinstance(price, int | float) or isinstance(price, bool) or price < 0:
            raise ConfigError(f"price table {origin}: instance {name} usd_per_hour must be a number ≥ 0")
        instances[str(name)] = Instance(
            name=str(name),
            platform=str(entry["platform"]).lower(),
            usd_per_hour=float(price),
            source=str(entry["source"]),
            date=str(entry["date"]),
            accelerator=str(entry.get("accelerator", "")),
            accelerators=int(entry.get("accelerators", 0) or 0),
            pricing=str(entry.get("pricing", "on-demand")),
            note=str(entry.get("note", "")),
            arch=normalize_arch(str(entry.get("arch", ""))),
            vcpus=_count(entry.get("vcpus"), f"price table {origin}: instance {name} vcpus"),
            memory_gib=float(
                _count(entry.get("memory_gib"), f"price table {origin}: instance {name} memory_gib")
            ),
            cpu_vendor=str(entry.get("cpu_vendor", "")).lower(),
        )
    defaults = {str(k).lower(): str(v) for k, v in (data.get("defaults") or {}).items()}
    for platform, name in defaults.items():
        if name not in instances:
            raise ConfigError(f"price table {origin}: default for {platform} names unknown instance {name!r}")
    return PriceTable(instances, defaults, float(data.get("hours_per_month", 730.0)), origin)


def _count(value: Any, what: str) -> int:
    if value is None:
        return 0
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{what} must be a number ≥ 0")
    return int(value)


_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


def normalize_arch(machine: str) -> str:
    """`platform.machine()` spellings onto one: x86_64 or arm64 ("" stays "", others are kept lower-case)."""
    m = machine.strip().lower()
    return _ARCH.get(m, m)


@dataclass(frozen=True, slots=True)
class HostShape:
    """What of the measuring host sets the instance that prices it (from the manifest's `host` block)."""

    machine: str = ""  # platform.machine()
    cores: int | None = None  # logical CPUs, as vCPUs count them
    cpu_model: str = ""

    @property
    def vendor(self) -> str:
        model = self.cpu_model.lower()
        return next((v for v in ("amd", "intel") if v in model), "")


@dataclass(frozen=True, slots=True)
class InstanceChoice:
    instance: Instance
    why: str  # e.g. "x86_64 like the host, 2 vCPUs for its 2 cores, 8 GiB for a 5.1 GiB peak"


def choose_instance(
    prices: PriceTable,
    platform: str,
    host: HostShape | None,
    memory_peak_bytes: float | None = None,
    override: str | None = None,
) -> InstanceChoice:
    """The instance that prices a capacity measured on `host` (see the module docstring)."""
    if override:
        return InstanceChoice(prices.for_platform(platform, override), "chosen with --instance")
    arch = normalize_arch(host.machine) if host else ""
    if platform != "cpu" or not arch:
        return InstanceChoice(prices.for_platform(platform), f"the price table's default for {platform}")
    need_gib = (memory_peak_bytes or 0.0) / 2**30
    cores = (host.cores if host else None) or 1
    fits = [
        i
        for i in prices.instances.values()
        if i.platform == "cpu" and i.arch == arch and i.vcpus >= cores and i.memory_gib >= need_gib
    ]
    if not fits:
        default = prices.for_platform(platform)
        return InstanceChoice(
            default,
            f"no {arch} instance in {prices.origin} with ≥ {cores} vCPUs and ≥ {need_gib:.1f} GiB: the table's "
            f"default ({default.arch or 'architecture not stated'}); pass --instance or add one",
        )
    vendor = host.vendor if host else ""
    best = min(fits, key=lambda i: (i.vcpus, bool(vendor) and i.cpu_vendor != vendor, i.usd_per_hour))
    why = f"{arch} like the host, {best.vcpus} vCPUs for its {cores} cores"
    if need_gib:
        why += f", {best.memory_gib:g} GiB for a {need_gib:.1f} GiB memory peak"
    if vendor and best.cpu_vendor == vendor:
        why += f", {vendor.upper() if vendor == 'amd' else vendor.title()} like the host"
    return InstanceChoice(best, why)


@dataclass(frozen=True, slots=True)
class Cost:
    instance: str
    usd_per_hour: float
    replicas: int
    usd_per_month: float
    usd_per_1m_input_tokens: float | None
    usd_per_1m_output_tokens: float | None
    usd_per_1m_tokens: float | None
    price_source: str
    price_date: str
    why: str = ""  # why this instance (InstanceChoice.why)


def _per_million(usd_per_hour: float, tokens_per_s: float | None) -> float | None:
    if not tokens_per_s or tokens_per_s <= 0:
        return None
    return usd_per_hour / (tokens_per_s * 3600.0) * 1e6


def cost_of(
    cap: Capacity, replicas: int, instance: Instance, hours_per_month: float = 730.0, why: str = ""
) -> Cost:
    both = None
    if cap.input_tokens_per_s is not None or cap.output_tokens_per_s is not None:
        both = (cap.input_tokens_per_s or 0.0) + (cap.output_tokens_per_s or 0.0)
    return Cost(
        instance=instance.name,
        usd_per_hour=instance.usd_per_hour,
        replicas=replicas,
        usd_per_month=replicas * instance.usd_per_hour * hours_per_month,
        usd_per_1m_input_tokens=_per_million(instance.usd_per_hour, cap.input_tokens_per_s),
        usd_per_1m_output_tokens=_per_million(instance.usd_per_hour, cap.output_tokens_per_s),
        usd_per_1m_tokens=_per_million(instance.usd_per_hour, both),
        price_source=instance.source,
        price_date=instance.date,
        why=why,
    )


# -- energy: the GPU's electricity at a stated price ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnergyPrice:
    """$/kWh and where it came from (`bench decide --usd-per-kwh`, or a price table's `energy:` block)."""

    usd_per_kwh: float
    source: str
    date: str = ""


def energy_price(data: Any, origin: str) -> EnergyPrice | None:
    """A price table's optional `energy: {usd_per_kwh, source, date}` block (None when absent)."""
    if data is None:
        return None
    price = data.get("usd_per_kwh") if isinstance(data, Mapping) else None
    if not isinstance(price, int | float) or isinstance(price, bool) or price < 0:
        raise ConfigError(f"price table {origin}: energy.usd_per_kwh must be a number ≥ 0 ($ per kWh)")
    if not data.get("source"):
        raise ConfigError(f"price table {origin}: energy needs a `source` (where the $/kWh comes from)")
    return EnergyPrice(float(price), str(data["source"]), str(data.get("date", "")))


@dataclass(frozen=True, slots=True)
class EnergyCost:
    """The GPU energy of serving, priced: only the GPUs' board power as NVML reports it (not the host's CPUs,
    memory, fans or the data centre's cooling overhead), at the energy per token measured at `at_point`."""

    j_per_output_token: float
    at_point: str
    usd_per_kwh: float
    kwh_per_1m_output_tokens: float
    usd_per_1m_output_tokens: float
    usd_per_month: float | None  # replicas × the capacity's output tokens/s, every hour of the month
    price_source: str
    price_date: str


def energy_cost(
    cap: Capacity,
    replicas: int,
    j_per_output_token: float,
    at_point: str,
    price: EnergyPrice,
    hours_per_month: float = 730.0,
) -> EnergyCost:
    """1 kWh = 3.6 MJ: kWh per 1M tokens = J/token × 1e6 / 3.6e6."""
    kwh_per_1m = j_per_output_token * 1e6 / 3.6e6
    per_month = None
    if cap.output_tokens_per_s:
        joules = j_per_output_token * cap.output_tokens_per_s * 3600.0 * hours_per_month * replicas
        per_month = joules / 3.6e6 * price.usd_per_kwh
    return EnergyCost(
        j_per_output_token=j_per_output_token,
        at_point=at_point,
        usd_per_kwh=price.usd_per_kwh,
        kwh_per_1m_output_tokens=kwh_per_1m,
        usd_per_1m_output_tokens=kwh_per_1m * price.usd_per_kwh,
        usd_per_month=per_month,
        price_source=price.source,
        price_date=price.date,
    )
