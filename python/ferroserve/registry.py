"""Loaded models by name and alias."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from ferroserve import _core
from ferroserve.backends.base import Backend, BackendInfo
from ferroserve.backends.local import LocalChatModel, LocalEmbeddingModel
from ferroserve.config import BackendSpec, ConfigError, ModelSpec, Settings, default_numerics
from ferroserve.gateway.router import Health
from ferroserve.log import logger


B = TypeVar("B", LocalEmbeddingModel, LocalChatModel)


class StartupRefused(Exception):
    """A model cannot be served as configured (e.g. its explicit --device fails); the
    server must not start. The message says why."""


@dataclass(eq=False)
class LoadedModel:
    spec: ModelSpec
    backend: Backend
    created: int
    info: BackendInfo
    health: Health
    # A local model's arithmetic (chat: "exact" or "fast"; embedding: "f32" or "int8"); None for
    # remote models.
    numerics: str | None = None

    @property
    def capabilities(self) -> list[str]:
        return self.info.capabilities

    @property
    def context_length(self) -> int | None:
        return self.info.context_length

    @property
    def dimensions(self) -> int | None:
        return self.info.dimensions

    @property
    def device(self) -> str | None:
        return self.info.device


class Registry:
    def __init__(self) -> None:
        self.models: dict[str, LoadedModel] = {}
        self._names: dict[str, str] = {}
        # Connection pools / clients shared by the models of one [[backends]] table.
        self.pools: dict = {}

    def resolve_name(self, requested: str) -> str | None:
        return self._names.get(requested)

    def get(self, requested: str) -> LoadedModel | None:
        name = self._names.get(requested)
        return self.models[name] if name is not None else None

    def load_all(self, settings: Settings) -> None:
        for spec in settings.models:
            self.load(spec, settings)

    def load(self, spec: ModelSpec, settings: Settings) -> None:
        tty = sys.stderr.isatty()
        where = spec.path if spec.backend == "local" else f"backend {spec.backend}"
        if tty:
            print(f"ferroserve: loading {spec.name} from {where} …", end="", file=sys.stderr, flush=True)
        started = time.perf_counter()
        created = int(time.time())
        backend: Backend
        numerics = None
        if spec.backend != "local":
            backend = self._remote(spec, settings)
        else:
            # A model file the engine refuses (corrupt, truncated, unsupported) or settings it
            # cannot run with: the server must not start, and says why (exit status 2).
            try:
                if spec.kind == "chat":
                    backend, numerics = self._load_chat(spec, settings)
                else:
                    backend = self._load_embedding(spec, settings)
                    numerics = settings.embed_numerics
            except _core.FerroserveError as exc:
                raise StartupRefused(f"model {spec.name}: {exc}") from None
        info = backend.info()
        loaded = LoadedModel(spec=spec, backend=backend, created=created, info=info,
                             health=Health(settings.breaker_failures, settings.breaker_cooldown_s), numerics=numerics)
        backend.info_changed = lambda: setattr(loaded, "info", backend.info())
        self.models[spec.name] = loaded
        for n in (spec.name, *spec.aliases):
            self._names[n] = spec.name
        seconds = time.perf_counter() - started
        if tty:
            print(f" ready in {seconds:.2f} s on {loaded.device}", file=sys.stderr, flush=True)
        fields = {"model": spec.name, "backend": info.backend, "device": loaded.device, "seconds": round(seconds, 3)}
        if numerics is not None:
            fields["numerics"] = numerics
        logger.info("model loaded", extra={"fields": fields})

    def _remote(self, spec: ModelSpec, settings: Settings) -> Backend:
        backend: BackendSpec = next(b for b in settings.backends if b.name == spec.backend)
        try:
            if backend.kind == "upstream":
                from ferroserve.backends import upstream

                return upstream.create(spec, backend, self.pools)
            try:
                from ferroserve.backends import triton
            except ImportError as exc:
                raise StartupRefused(f"model {spec.name}: the triton backend needs tritonclient "
                                     f"(pip install 'ferroserve[triton]'): {exc}") from None
            return triton.create(spec, backend, self.pools)
        except ConfigError as exc:
            raise StartupRefused(f"model {spec.name}: {exc}") from None

    @staticmethod
    def _load_chat(spec: ModelSpec, settings: Settings) -> tuple[LocalChatModel, str]:
        """The chat model and the numerics it runs: the configured ones, else
        `default_numerics` for the device it lands on (`auto` tries OpenCL with exact first:
        the user asked for a device; on a fallback to the CPU, the CPU's default)."""
        chosen: dict[str, str] = {}  # the numerics of the last load attempted, i.e. of the one that succeeded

        def load(device: str) -> LocalChatModel:
            chosen["numerics"] = settings.numerics or default_numerics(device, _core.cpu_isa())
            return LocalChatModel.load(
                spec.name,
                spec.path,
                kv_budget_bytes=settings.kv_budget_bytes,
                max_batch_tokens=settings.max_batch_tokens,
                burst_batch_tokens=settings.burst_batch_tokens,
                max_running=settings.max_running,
                chat_template=settings.chat_template,
                numerics=chosen["numerics"],
                device=device,
                kernel_binaries=settings.kernel_binaries if device != "cpu" else None,
                spec=spec,
                max_queue=settings.max_queue,
            )

        if spec.device == "auto" and settings.numerics == "fast":
            logger.warning(
                "chat model stays on the CPU",
                extra={"fields": {"model": spec.name, "reason": "--numerics fast is CPU-only; the OpenCL kernels compute the exact order"}},
            )
            return load("cpu"), chosen["numerics"]
        chat = _on_device(spec, load)
        if chat.engine.device_check is not None:
            logger.info("device check", extra={"fields": {"model": spec.name, "device": chat.engine.device, "result": chat.engine.device_check}})
        return chat, chosen["numerics"]

    @staticmethod
    def _load_embedding(spec: ModelSpec, settings: Settings) -> LocalEmbeddingModel:
        def load(device: str) -> LocalEmbeddingModel:
            return LocalEmbeddingModel.load(
                spec.name,
                spec.path,
                max_batch_tokens=settings.embed_max_batch_tokens,
                max_wait_us=settings.embed_max_wait_us,
                batch_pass_tokens=settings.embed_batch_pass_tokens,
                batch_pass_tokens_busy=settings.embed_batch_pass_tokens_busy,
                device=device,
                kernel_binaries=settings.kernel_binaries if device != "cpu" else None,
                spec=spec,
                max_queue=settings.max_embedding_queue,
                numerics=settings.embed_numerics,
            )

        if spec.device == "auto" and settings.embed_numerics != "f32":
            logger.warning(
                "embedding model stays on the CPU",
                extra={"fields": {"model": spec.name, "reason": "--embed-numerics int8 is CPU-only; the OpenCL kernels compute f32"}},
            )
            return load("cpu")
        return _on_device(spec, load)


def _on_device(spec: ModelSpec, load: Callable[[str], B]) -> B:
    """Loads on the spec's device. `opencl:N` is explicit: if it cannot be used (no driver,
    kernels that do not build, a load check that disagrees with the CPU), StartupRefused.
    `auto` tries OpenCL device 0 and falls back to the CPU, logging the reason."""
    if spec.device == "cpu":
        return load("cpu")
    device = "opencl:0" if spec.device == "auto" else spec.device
    try:
        return load(device)
    except _core.DeviceError as exc:
        if spec.device != "auto":
            raise StartupRefused(f"model {spec.name}: --device {device} cannot be used: {exc}") from None
        logger.warning("OpenCL unavailable, using the CPU", extra={"fields": {"model": spec.name, "device": device, "reason": str(exc)}})
        return load("cpu")
