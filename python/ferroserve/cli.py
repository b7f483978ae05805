"""`ferroserve serve | models | devices`."""

from __future__ import annotations

import argparse
import os
import sys

from ferroserve import __version__
from ferroserve.config import SETTINGS_ENV, ConfigError, resolve


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = resolve(
            host=args.host,
            port=args.port,
            model_args=args.model,
            log_level=args.log_level,
            max_body_bytes=args.max_body_bytes,
            max_inputs=args.max_inputs,
            chat_template_file=args.chat_template,
            numerics=args.numerics,
        )
    except ConfigError as exc:
        print(f"ferroserve: error: {exc}", file=sys.stderr)
        return 2
    os.environ[SETTINGS_ENV] = settings.to_json()

    from granian import Granian
    from granian.constants import Interfaces, Loops

    try:
        import uvloop  # noqa: F401

        loop = Loops.uvloop
    except ImportError:
        loop = Loops.asyncio
    # One worker: the engine lives in it, and more processes would split batches.
    Granian(
        "ferroserve.app:create_app",
        factory=True,
        address=settings.host,
        port=settings.port,
        interface=Interfaces.RSGI,
        workers=1,
        loop=loop,
        log_level=settings.log_level if settings.log_level != "warning" else "warn",
        log_access=False,
    ).serve()
    return 0


def _models(args: argparse.Namespace) -> int:
    try:
        settings = resolve(model_args=args.model)
    except ConfigError as exc:
        print(f"ferroserve: error: {exc}", file=sys.stderr)
        return 2
    for m in settings.models:
        aliases = f" (aliases: {', '.join(m.aliases)})" if m.aliases else ""
        print(f"{m.name}\t{m.kind}\t{m.path}{aliases}")
    return 0


def _devices(args: argparse.Namespace) -> int:
    from ferroserve import _core

    print(f"cpu\tisa={_core.cpu_isa()}\tcores={os.cpu_count()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferroserve", description="OpenAI-compatible inference server.")
    p.add_argument("--version", action="version", version=f"ferroserve {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the models over HTTP")
    serve.add_argument("--host", help="bind address (default 127.0.0.1, env FERROSERVE_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8000, env FERROSERVE_PORT)")
    serve.add_argument("--model", action="append", metavar="NAME=PATH", help="serve a model folder/file under NAME (repeatable; env FERROSERVE_MODELS=a=p,b=q)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="env FERROSERVE_LOG_LEVEL")
    serve.add_argument("--max-body-bytes", type=int, help="largest accepted request body (default 16 MiB)")
    serve.add_argument("--max-inputs", type=int, help="most inputs in one embeddings request (default 2048)")
    serve.add_argument("--chat-template", metavar="FILE", help="Jinja chat template replacing the GGUF's own (env FERROSERVE_CHAT_TEMPLATE)")
    serve.add_argument(
        "--numerics", choices=["exact", "fast"],
        help="chat matmul arithmetic: exact = llama.cpp's, same greedy output (default); fast = "
        "AVX-512 panels, several times faster batches, other roundings (env FERROSERVE_NUMERICS)",
    )
    serve.set_defaults(func=_serve)

    models = sub.add_parser("models", help="list the models `serve` would load")
    models.add_argument("--model", action="append", metavar="NAME=PATH")
    models.set_defaults(func=_models)

    devices = sub.add_parser("devices", help="list compute devices")
    devices.set_defaults(func=_devices)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
