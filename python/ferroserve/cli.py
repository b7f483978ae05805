"""`ferroserve serve | keys | models | kernels | devices`."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import tempfile
import time
from pathlib import Path

from ferroserve import __version__
from ferroserve.config import (
    SETTINGS_ENV, STARTUP_ERROR_ENV, ConfigError, ModelSpec, default_numerics, parse_device, resolve, resolve_data_dir,
)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_auth(settings) -> str | None:
    """Why the server must not start, or None: no keys is fine only on loopback."""
    if not settings.gateway or settings.insecure_no_auth or _is_loopback(settings.host):
        return None
    from ferroserve.gateway.store_api import open_store

    store = open_store(settings.data_dir, settings.database_url)
    try:
        if store.keys():
            return None
    finally:
        store.close()
    return (
        f"refusing to serve on {settings.host} without API keys: anyone who can reach it could use it. "
        f"Create a key with `ferroserve keys create --workspace NAME --data-dir {settings.data_dir}`, "
        "bind to 127.0.0.1, or pass --insecure-no-auth."
    )


def _check_shared_state(settings) -> str | None:
    """Why the shared database or Redis cannot be used (unreachable, refused), or None. Checked
    here, before the server starts, so a wrong URL is one clear line and status 2; the schema
    is migrated here too (the worker finds it current)."""
    if settings.database_url:
        import psycopg

        from ferroserve.gateway.pg_store import describe, migrate

        try:
            with psycopg.connect(settings.database_url, autocommit=True, connect_timeout=10) as conn:
                migrate(conn)
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0]
            return f"cannot use the database {describe(settings.database_url)}: {reason}"
    if settings.redis_url:
        import redis

        from ferroserve.gateway.shared_limits import connect

        client = connect(settings.redis_url)
        try:
            client.ping()
        except redis.RedisError as exc:
            return f"cannot reach Redis at --redis-url: {exc}"
        finally:
            client.close()
    return None


def _isa_refusal() -> str | None:
    """Why FERROSERVE_ISA cannot be honoured on this CPU (a level it lacks, or no level at
    all), or None. Checked before anything loads: a server never silently runs another
    level than the one asked for, and never one the CPU lacks."""
    from ferroserve import _core

    try:
        _core.cpu_isa()
    except ValueError as exc:
        return str(exc)
    return None


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = resolve(
            host=args.host,
            port=args.port,
            model_args=args.model,
            data_dir=args.data_dir,
            price_args=args.price,
            insecure_no_auth=args.insecure_no_auth,
            log_level=args.log_level,
            max_body_bytes=args.max_body_bytes,
            max_inputs=args.max_inputs,
            chat_template_file=args.chat_template,
            numerics=args.numerics,
            embed_numerics=args.embed_numerics,
            device_args=args.device,
            kernel_binaries=args.kernel_binaries,
            config_file=args.config,
            embed_cache_mb=args.embed_cache_mb,
            default_max_tokens=args.default_max_tokens,
            max_tokens_limit=args.max_tokens_limit,
            max_header_bytes=args.max_header_bytes,
            header_timeout_s=args.header_timeout,
            shutdown_timeout_s=args.shutdown_timeout,
            max_queue=args.max_queue,
            max_embedding_queue=args.max_embedding_queue,
            public_url=args.public_url,
            database_url=args.database_url,
            pg_async_commit=args.pg_async_commit,
            redis_url=args.redis_url,
            limit_leases=None if args.limit_leases is None else args.limit_leases == "on",
            files_dir=args.files_dir,
        )
    except ConfigError as exc:
        print(f"ferroserve: error: {exc}", file=sys.stderr)
        return 2
    refusal = _isa_refusal() or _check_shared_state(settings) or _check_auth(settings)
    if refusal:
        print(f"ferroserve: error: {refusal}", file=sys.stderr)
        return 2
    os.environ[SETTINGS_ENV] = settings.to_json()
    # The worker loads the models; a refusal it hits (an explicit device that is missing or
    # fails to build or run) is written here so this process can exit with the reason and
    # status 2. Devices are not probed in this process: an OpenCL driver started here (PoCL
    # starts threads) would be inherited half-alive by granian's forked worker and hang it.
    startup_error = tempfile.NamedTemporaryFile(prefix="ferroserve-startup-", suffix=".txt", delete=False)
    startup_error.close()
    os.environ[STARTUP_ERROR_ENV] = startup_error.name

    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.http import HTTP1Settings

    try:
        import uvloop  # noqa: F401

        loop = Loops.uvloop
    except ImportError:
        loop = Loops.asyncio
    # One worker: the engine lives in it, and more processes would split batches.
    server = Granian(
        "ferroserve.app:create_app",
        factory=True,
        address=settings.host,
        port=settings.port,
        interface=Interfaces.RSGI,
        workers=1,
        loop=loop,
        log_level=settings.log_level if settings.log_level != "warning" else "warn",
        log_access=False,
        # Slow clients: all headers within header_timeout_s (slowloris is cut off); the head's
        # size is bounded by the read buffer (a bigger head is a 431).
        http1_settings=HTTP1Settings(header_read_timeout=int(settings.header_timeout_s * 1000),
                                     max_buffer_size=settings.max_header_bytes),
        # The worker drains for shutdown_timeout_s itself (App.__rsgi_init__); this is the
        # backstop for a worker that does not exit after that (it is then killed).
        workers_kill_timeout=int(settings.shutdown_timeout_s) + 30,
    )
    try:
        server.serve()
        status = 0
    except SystemExit as exc:  # granian exits when its worker dies (e.g. at startup)
        status = exc.code if isinstance(exc.code, int) else 1
    try:
        with open(startup_error.name) as f:
            reason = f.read().strip()
        os.unlink(startup_error.name)
    except OSError:
        reason = ""
    if reason:
        print(f"ferroserve: error: {reason}", file=sys.stderr)
        return 2
    return status


def _models(args: argparse.Namespace) -> int:
    try:
        settings = resolve(model_args=args.model, device_args=args.device, config_file=args.config, numerics=args.numerics)
    except ConfigError as exc:
        print(f"ferroserve: error: {exc}", file=sys.stderr)
        return 2
    names = {n: m for m in settings.models for n in (m.name, *m.aliases)}
    for m in settings.models:
        aliases = f" (aliases: {', '.join(m.aliases)})" if m.aliases else ""
        where = m.path if m.backend == "local" else f"backend {m.backend}, as {m.upstream_model or m.name}"
        # The candidates a request for this name tries, in order (model "auto" ranks them per
        # request; see the README).
        candidates = [m.name, *(names[f].name for f in m.fallbacks)]
        quality = "" if m.quality is None else f"\tquality={m.quality:g}"
        numerics = f"\tnumerics={_chat_numerics(m, settings.numerics)}" if m.kind == "chat" and m.backend == "local" else ""
        print(f"{m.name}\t{m.kind}\t{m.device}\t{where}{aliases}\tcandidates: {' -> '.join(candidates)}{quality}{numerics}")
    return 0


def _chat_numerics(spec: ModelSpec, configured: str | None) -> str:
    """The numerics `serve` would give this local chat model (the registry decides the same
    way at load): the configured ones, else the default for its device at this CPU level."""
    from ferroserve import _core

    if configured == "fast" and spec.device == "auto":
        return "fast (on the CPU)"
    if configured is not None:
        return configured
    try:
        level = _core.cpu_isa()
    except ValueError:  # FERROSERVE_ISA names a level this CPU lacks: `serve` refuses it
        return "unknown (FERROSERVE_ISA cannot run here)"
    if spec.device == "auto" and default_numerics("cpu", level) != "exact":
        return f"exact on OpenCL, else {default_numerics('cpu', level)} on the CPU"
    if spec.device == "auto":
        return "exact"
    return default_numerics(spec.device, level)


def _kernels(args: argparse.Namespace) -> int:
    """Builds the OpenCL kernels every configured model needs on one device and writes their
    program binaries to --out, for `serve --device opencl:N --kernel-binaries DIR` (on an
    FPGA flow, the place for offline-compiled .aocx files is the same directory)."""
    import filecmp

    from ferroserve import _core

    try:
        settings = resolve(model_args=args.model, config_file=args.config)
        device = parse_device(args.device)
    except ConfigError as exc:
        print(f"ferroserve: error: {exc}", file=sys.stderr)
        return 2
    if not device.startswith("opencl:"):
        print(f"ferroserve: error: --device must be opencl or opencl:N, got {args.device!r}", file=sys.stderr)
        return 2
    # The chat kernels are compiled for the CPU level's Q8_0 order (kernels/README.md).
    refusal = _isa_refusal()
    if refusal:
        print(f"ferroserve: error: {refusal}", file=sys.stderr)
        return 2
    index = int(device.split(":")[1])
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}  # file -> the model that wrote it
    local = [m for m in settings.models if m.backend == "local"]
    for m in local:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            try:
                files = _core.write_kernel_binaries(m.kind, m.path, index, tmp)
            except _core.FerroserveError as exc:
                print(f"ferroserve: error: model {m.name}: {exc}", file=sys.stderr)
                return 2
            for f in map(Path, files):
                target = out / f.name
                if f.name in written and not filecmp.cmp(f, target, shallow=False):
                    # Same kernel, other -D values (e.g. another head width): one directory
                    # cannot hold both.
                    print(f"ferroserve: error: models {written[f.name]} and {m.name} need different builds of "
                          f"{f.stem}; write their binaries to separate directories (--model)", file=sys.stderr)
                    return 2
                os.replace(f, target)
                written[f.name] = m.name
                print(target)
    print(f"ferroserve: {len(written)} kernel binaries for {len(local)} model(s) on {device}; serve with "
          f"--device {device} --kernel-binaries {out}", file=sys.stderr)
    return 0


def _database_url(args: argparse.Namespace) -> str | None:
    from ferroserve.config import _env, check_database_url

    return check_database_url(args.database_url or _env("DATABASE_URL"))


def _keys(args: argparse.Namespace) -> int:
    from ferroserve.gateway import keys as keymod
    from ferroserve.gateway.store_api import open_store

    try:
        store = open_store(resolve_data_dir(args.data_dir), _database_url(args))
    except ConfigError as exc:
        print(f"ferroserve: error: {exc}", file=sys.stderr)
        return 2
    try:
        now = time.time()
        if args.keys_command == "create":
            try:
                expires_at = keymod.parse_expiry(args.expires) if args.expires else None
                secret, key = keymod.make_key(
                    workspace=args.workspace, prefix=args.prefix or os.environ.get("FERROSERVE_KEY_PREFIX") or keymod.DEFAULT_KEY_PREFIX,
                    rpm=args.rpm, tpm=args.tpm, models=args.models.split(",") if args.models else None,
                    expires_at=expires_at, admin=args.admin, now=now,
                )
            except ValueError as exc:
                print(f"ferroserve: error: {exc}", file=sys.stderr)
                return 2
            if args.budget_usd is not None and args.budget_usd < 0:
                print("ferroserve: error: --budget-usd must not be negative", file=sys.stderr)
                return 2
            # The workspace's budget first: a server that loads the key between the two commits
            # would otherwise serve it unbudgeted until its next reload (≤ 0.5 s).
            store.upsert_workspace(key.workspace, monthly_budget_usd=args.budget_usd,
                                   capture_prompts=True if args.capture_prompts else None)
            store.insert_key(key)
            print(secret)
            print(f"created {key.id} in workspace {key.workspace} (the key is shown only once)", file=sys.stderr)
        elif args.keys_command == "list":
            workspaces = store.workspaces()
            print("id\tworkspace\thint\tstatus\tadmin\trpm\ttpm\tmodels\texpires\tbudget_usd")
            for k in store.keys():
                ws = workspaces.get(k.workspace)
                expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(k.expires_at)) if k.expires_at else "-"
                budget = ws.monthly_budget_usd if ws is not None and ws.monthly_budget_usd is not None else "-"
                models = ",".join(sorted(k.models)) if k.models is not None else "*"
                print(f"{k.id}\t{k.workspace}\t{k.hint}\t{k.state(now)}\t{'yes' if k.admin else 'no'}\t"
                      f"{k.rpm or '-'}\t{k.tpm or '-'}\t{models}\t{expires}\t{budget}")
        elif args.keys_command == "workspace-secret":
            # Batch webhooks are signed with it (HMAC-SHA-256); shown, or replaced with --rotate.
            print(store.webhook_secret(args.workspace, rotate=args.rotate))
            if args.rotate:
                print(f"rotated the webhook secret of workspace {args.workspace}", file=sys.stderr)
        elif args.keys_command == "revoke":
            if not store.revoke_key(args.key_id):
                print(f"ferroserve: error: no active key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}", file=sys.stderr)
    finally:
        store.close()
    return 0


def _db(args: argparse.Namespace) -> int:
    """`ferroserve db migrate`: brings the PostgreSQL schema up to date (servers also do it at
    start; this lets a deployment do it once, before rolling replicas out)."""
    try:
        url = _database_url(args)
    except ConfigError as exc:
        print(f"ferroserve: error: {exc}", file=sys.stderr)
        return 2
    if not url:
        print("ferroserve: error: db migrate needs --database-url or FERROSERVE_DATABASE_URL "
              "(the SQLite store migrates itself when opened)", file=sys.stderr)
        return 2
    import psycopg

    from ferroserve.gateway.pg_migrations import MIGRATIONS
    from ferroserve.gateway.pg_store import describe, migrate

    try:
        with psycopg.connect(url, autocommit=True) as conn:
            applied = migrate(conn)
    except psycopg.Error as exc:
        print(f"ferroserve: error: {describe(url)}: {exc}", file=sys.stderr)
        return 1
    latest = MIGRATIONS[-1][0]
    if applied:
        print(f"applied migrations {', '.join(map(str, applied))}; schema version {latest}", file=sys.stderr)
    else:
        print(f"schema already at version {latest}", file=sys.stderr)
    return 0


def _devices(args: argparse.Namespace) -> int:
    """The CPU line, then one line per OpenCL device numbered as `--device opencl:N` counts
    them. pyopencl describes them when installed (it is the tool people already use for
    this); otherwise the server's own run-time-loaded OpenCL view does. Never fails for
    want of OpenCL: a line says what is missing."""
    from ferroserve import _core

    refusal = _isa_refusal()
    if refusal:
        print(f"ferroserve: error: {refusal}", file=sys.stderr)
        return 2
    print(f"cpu\tisa={_core.cpu_isa()}\tlevels={','.join(_core.cpu_isa_levels())}\tcores={os.cpu_count()}")
    try:
        import pyopencl as cl
    except ImportError as exc:  # not installed, or its libOpenCL cannot be loaded
        cl, why_no_pyopencl = None, str(exc)
    if cl is not None:
        try:
            platforms = cl.get_platforms()
        except cl.Error as exc:  # the ICD loader found no platform
            print(f"opencl\tnone: no OpenCL platform ({exc}); install an OpenCL driver such as pocl-opencl-icd")
            return 0
        index = 0
        for p in platforms:
            try:
                devices = p.get_devices()
            except cl.Error:
                devices = []
            for d in devices:
                print(f"opencl:{index}\t{d.name.strip()}\tplatform={p.name.strip()}\tversion={d.version.strip()}"
                      f"\tglobal_mem={d.global_mem_size / 2**30:.1f} GiB\tcompute_units={d.max_compute_units}")
                index += 1
        if index == 0:
            print("opencl\tnone: OpenCL platforms found but no device")
        return 0
    try:
        devices = _core.opencl_devices()
    except _core.DeviceError as exc:
        print(f"opencl\tnone: {exc} (and pyopencl cannot be imported: {why_no_pyopencl})")
        return 0
    for d in devices:
        print(f"opencl:{d['index']}\t{d['name']}\tplatform={d['platform']}\tversion={d['version']}"
              f"\tglobal_mem={d['global_mem_bytes'] / 2**30:.1f} GiB\tcompute_units={d['compute_units']}"
              "\t(listed by ferroserve's own OpenCL loader: pyopencl cannot be imported)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferroserve", description="OpenAI-compatible inference server.")
    p.add_argument("--version", action="version", version=f"ferroserve {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the models over HTTP")
    serve.add_argument("--config", metavar="FILE", help="TOML settings file: top-level keys as the flags spell them, [[models]] tables with name, path, aliases, device and prices, [[backends]] for remote models (README); flags and FERROSERVE_* override it (env FERROSERVE_CONFIG)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1, env FERROSERVE_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8000, env FERROSERVE_PORT)")
    serve.add_argument("--model", action="append", metavar="NAME=PATH", help="serve a model folder/file under NAME (repeatable; env FERROSERVE_MODELS=a=p,b=q)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="env FERROSERVE_LOG_LEVEL")
    serve.add_argument("--data-dir", metavar="DIR", help="keys, usage and request history (SQLite); default ~/.local/share/ferroserve, env FERROSERVE_DATA_DIR")
    serve.add_argument("--price", action="append", metavar="NAME=IN:OUT", help="USD per million input:output tokens for a model (repeatable; env FERROSERVE_PRICES=a=1:2,b=0.1:0)")
    serve.add_argument("--insecure-no-auth", action="store_true", help="serve without API keys on a non-loopback address")
    serve.add_argument("--max-body-bytes", type=int, help="largest accepted request body (default 16 MiB)")
    serve.add_argument("--max-inputs", type=int, help="most inputs in one embeddings request (default 2048)")
    serve.add_argument("--chat-template", metavar="FILE", help="Jinja chat template replacing the GGUF's own (env FERROSERVE_CHAT_TEMPLATE)")
    serve.add_argument(
        "--numerics", choices=["exact", "fast"],
        help="chat matmul arithmetic: fast = repacked panels, several times faster batches, as close to "
        "the model as exact (the default on AVX2/AVX-512 CPUs); exact = llama.cpp's, same greedy output "
        "(the default on the portable level and on OpenCL); env FERROSERVE_NUMERICS",
    )
    serve.add_argument(
        "--embed-numerics", choices=["f32", "int8"],
        help="embedding models' linear layers: f32 (default; cosine >= 0.9999 to sentence-transformers) "
        "or int8 (opt-in, CPU only: 8-bit weights and activations, ONNX Runtime int8's accuracy, "
        "cosine >= 0.9992, a quarter of the weight memory; not faster on a Zen 1, see the README); env FERROSERVE_EMBED_NUMERICS",
    )
    serve.add_argument(
        "--device", action="append", metavar="[NAME=]DEVICE",
        help="cpu (default), opencl[:N] (refuse to start if it cannot be used) or auto (OpenCL device 0, "
        "else the CPU, with the reason logged); NAME= for one model only (repeatable). Chat models on "
        "OpenCL run --numerics exact (an explicit fast keeps them off it) (env FERROSERVE_DEVICE)",
    )
    serve.add_argument(
        "--kernel-binaries", metavar="DIR",
        help="load precompiled OpenCL program binaries <kernel>.bin / .aocx (e.g. FPGA bitstreams) "
        "instead of building the kernel sources (env FERROSERVE_KERNEL_BINARIES)",
    )
    serve.add_argument(
        "--embed-cache-mb", type=int, metavar="MB",
        help="memory for cached embedding responses (identical requests answered byte for byte for "
        "embed_cache_ttl_s, default 1 h); 0 turns the cache off (default 64, env FERROSERVE_EMBED_CACHE_MB)",
    )
    serve.add_argument(
        "--default-max-tokens", type=int, metavar="N",
        help="max_tokens of a chat completion or response that names none (default: to the end of the "
        "context, as OpenAI; env FERROSERVE_DEFAULT_MAX_TOKENS)",
    )
    serve.add_argument(
        "--max-tokens-limit", type=int, metavar="N",
        help="the most tokens one request may generate per choice; a request asking for more is a 400, one "
        "naming none stops there (default: no limit but the context; env FERROSERVE_MAX_TOKENS_LIMIT)",
    )
    serve.add_argument(
        "--max-header-bytes", type=int, metavar="N",
        help="largest accepted request head (request line and headers); a bigger one is a 431 (default 65536, "
        "env FERROSERVE_MAX_HEADER_BYTES)",
    )
    serve.add_argument(
        "--header-timeout", type=float, metavar="SECONDS",
        help="time a client has to send a request's headers; a slower one is disconnected (default 30, "
        "env FERROSERVE_HEADER_TIMEOUT)",
    )
    serve.add_argument(
        "--shutdown-timeout", type=float, metavar="SECONDS",
        help="on SIGTERM, how long requests in flight (streams too) may take to finish before they are cut; "
        "new connections are refused at once (default 30, env FERROSERVE_SHUTDOWN_TIMEOUT)",
    )
    serve.add_argument(
        "--max-queue", type=int, metavar="N",
        help="admission control: chat sequences that may wait per chat model for a place in the running batch; "
        "beyond them a request gets 503 capacity_unavailable with Retry-After at once (default: half of "
        "FERROSERVE_MAX_RUNNING, i.e. 32; env FERROSERVE_MAX_QUEUE)",
    )
    serve.add_argument(
        "--max-embedding-queue", type=int, metavar="N",
        help="admission control: requests one embedding model may hold queued or embedding (default 1024; "
        "env FERROSERVE_MAX_EMBEDDING_QUEUE)",
    )
    serve.add_argument(
        "--public-url", metavar="URL",
        help="this server's address as clients reach it (e.g. https://api.example.com behind a proxy), used "
        "in signed batch-result URLs and webhook payloads (default: the request's Host header; env FERROSERVE_PUBLIC_URL)",
    )
    serve.add_argument(
        "--database-url", metavar="URL",
        help="keep keys, usage, budgets, stored responses, files and batches in this PostgreSQL database "
        "(postgresql://user:pass@host/db), shared by replicas, instead of SQLite under --data-dir "
        "(env FERROSERVE_DATABASE_URL)",
    )
    serve.add_argument(
        "--pg-async-commit", action="store_true",
        help="commit usage records to PostgreSQL with synchronous_commit=off (they alone): answers still wait "
        "for the commit, which survives this server being killed, but not for its WAL flush, so a PostgreSQL or "
        "OS crash can lose the last ~0.6 s (3 x wal_writer_delay) of usage records, as an OS crash can with "
        "SQLite's WAL; keys, files, batches and stored responses keep the database's durability "
        "(env FERROSERVE_PG_ASYNC_COMMIT=1)",
    )
    serve.add_argument(
        "--redis-url", metavar="URL",
        help="count rate-limit windows and budget reservations in this Redis (redis://host:port/0), so "
        "replicas together grant exactly each limit (default: each process counts its own; env FERROSERVE_REDIS_URL)",
    )
    serve.add_argument(
        "--limit-leases", choices=["on", "off"], default=None, type=str.lower,
        help="with --redis-url: on (default), a replica takes 1/100 of a large limit (>= 200 requests, tokens or "
        "budget worth two requests per lease) in one round trip and admits from it without one, while a tenth "
        "of the limit is left; a lease unused at its window's end is not granted to anyone (at most 1%% per "
        "replica), an idle budget lease goes back within 2 s; off: one Redis script per request, exact to the "
        "request (env FERROSERVE_LIMIT_LEASES=0)",
    )
    serve.add_argument(
        "--files-dir", metavar="DIR",
        help="uploaded files and batch inputs/results (default: under --data-dir); replicas share one path "
        "(env FERROSERVE_FILES_DIR)",
    )
    serve.set_defaults(func=_serve)

    keys = sub.add_parser("keys", help="create, list and revoke API keys; show or rotate workspace webhook secrets")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    data_dir_help = "same as `serve --data-dir` (env FERROSERVE_DATA_DIR)"
    database_url_help = "same as `serve --database-url` (env FERROSERVE_DATABASE_URL)"
    create = keys_sub.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--workspace", required=True)
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--budget-usd", type=float, help="the workspace's monthly spend cap in USD")
    create.add_argument("--models", help="comma-separated models (names or aliases) the key may use; default all")
    create.add_argument("--expires", metavar="DATE", help="YYYY-MM-DD (end of day, UTC) or an ISO date-time")
    create.add_argument("--admin", action="store_true", help="may use /v1/admin/* and see every workspace")
    create.add_argument("--capture-prompts", action="store_true", help="keep request bodies in the workspace's request history")
    create.add_argument("--prefix", help="key prefix (default fs-, env FERROSERVE_KEY_PREFIX)")
    create.add_argument("--data-dir", metavar="DIR", help=data_dir_help)
    create.add_argument("--database-url", metavar="URL", help=database_url_help)
    listing = keys_sub.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--data-dir", metavar="DIR", help=data_dir_help)
    listing.add_argument("--database-url", metavar="URL", help=database_url_help)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    revoke.add_argument("--data-dir", metavar="DIR", help=data_dir_help)
    revoke.add_argument("--database-url", metavar="URL", help=database_url_help)
    secret = keys_sub.add_parser("workspace-secret", help="print a workspace's webhook signing secret (made on first use)")
    secret.add_argument("--workspace", required=True)
    secret.add_argument("--rotate", action="store_true", help="replace it with a new one (webhooks sent after use the new one)")
    secret.add_argument("--data-dir", metavar="DIR", help=data_dir_help)
    secret.add_argument("--database-url", metavar="URL", help=database_url_help)
    keys.set_defaults(func=_keys)

    db = sub.add_parser("db", help="the shared PostgreSQL database")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_migrate = db_sub.add_parser("migrate", help="apply the schema migrations it lacks (servers also do at start)")
    db_migrate.add_argument("--database-url", metavar="URL", help=database_url_help)
    db.set_defaults(func=_db)

    models = sub.add_parser("models", help="list the models `serve` would load")
    models.add_argument("--config", metavar="FILE", help="TOML settings file: top-level keys as the flags spell them, [[models]] tables with name, path, aliases, device and prices, [[backends]] for remote models (README); flags and FERROSERVE_* override it (env FERROSERVE_CONFIG)")
    models.add_argument("--model", action="append", metavar="NAME=PATH")
    models.add_argument("--device", action="append", metavar="[NAME=]DEVICE", help="as for serve")
    models.add_argument("--numerics", choices=["exact", "fast"], help="as for serve (the list shows each chat model's)")
    models.set_defaults(func=_models)

    kernels = sub.add_parser("kernels", help="write the OpenCL kernels' program binaries for --kernel-binaries")
    kernels.add_argument("--config", metavar="FILE", help="TOML settings file: top-level keys as the flags spell them, [[models]] tables with name, path, aliases, device and prices, [[backends]] for remote models (README); flags and FERROSERVE_* override it (env FERROSERVE_CONFIG)")
    kernels.add_argument("--out", required=True, metavar="DIR", help="where to write <kernel>.bin files")
    kernels.add_argument("--device", default="opencl:0", metavar="DEVICE", help="opencl or opencl:N (default opencl:0)")
    kernels.add_argument("--model", action="append", metavar="NAME=PATH", help="as for serve (default: the default models)")
    kernels.set_defaults(func=_kernels)

    devices = sub.add_parser("devices", help="list compute devices")
    devices.set_defaults(func=_devices)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
