"""Loaded models by name and alias."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from ferroserve.backends.local import LocalChatModel, LocalEmbeddingModel
from ferroserve import _core
from ferroserve.config import ModelSpec, Settings
from ferroserve.log import logger


B = TypeVar("B", LocalEmbeddingModel, LocalChatModel)


class StartupRefused(Exception):
    """A model cannot be served as configured (e.g. its explicit --device fails); the
    server must not start. The message says why."""


@dataclass
class LoadedModel:
    spec: ModelSpec
    backend: LocalEmbeddingModel | LocalChatModel
    created: int
    capabilities: list[str]
    context_length: int
    dimensions: int | None
    device: str


class Registry:
    def __init__(self) -> None:
        self.models: dict[str, LoadedModel] = {}
        self._names: dict[str, str] = {}

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
        if tty:
            print(f"ferroserve: loading {spec.name} from {spec.path} …", end="", file=sys.stderr, flush=True)
        started = time.perf_counter()
        created = int(time.time())
        if spec.kind == "chat":
            chat = self._load_chat(spec, settings, created)
            loaded = LoadedModel(
                spec=spec,
                backend=chat,
                created=created,
                capabilities=["chat", "completions"],
                context_length=chat.engine.context_length,
                dimensions=None,
                device=chat.engine.device,
            )
        else:
            backend = self._load_embedding(spec, settings, created)
            loaded = LoadedModel(
                spec=spec,
                backend=backend,
                created=created,
                capabilities=["embeddings"],
                context_length=backend.engine.max_tokens,
                dimensions=backend.engine.dim,
                device=backend.engine.device,
            )
        self.models[spec.name] = loaded
        for n in (spec.name, *spec.aliases):
            self._names[n] = spec.name
        seconds = time.perf_counter() - started
        if tty:
            print(f" ready in {seconds:.2f} s on {loaded.device}", file=sys.stderr, flush=True)
        logger.info("model loaded", extra={"fields": {"model": spec.name, "device": loaded.device, "seconds": round(seconds, 3)}})

    @staticmethod
    def _load_chat(spec: ModelSpec, settings: Settings, created: int) -> LocalChatModel:
        def load(device: str) -> LocalChatModel:
            return LocalChatModel.load(
                spec.name,
                spec.path,
                kv_budget_bytes=settings.kv_budget_bytes,
                max_batch_tokens=settings.max_batch_tokens,
                max_running=settings.max_running,
                chat_template=settings.chat_template,
                numerics=settings.numerics,
                device=device,
                kernel_binaries=settings.kernel_binaries if device != "cpu" else None,
                created=created,
            )

        if spec.device == "auto" and settings.numerics != "exact":
            logger.warning(
                "chat model stays on the CPU",
                extra={"fields": {"model": spec.name, "reason": f"--numerics {settings.numerics} is CPU-only; the OpenCL kernels compute the exact order"}},
            )
            return load("cpu")
        chat = _on_device(spec, load)
        if chat.engine.device_check is not None:
            logger.info("device check", extra={"fields": {"model": spec.name, "device": chat.engine.device, "result": chat.engine.device_check}})
        return chat

    @staticmethod
    def _load_embedding(spec: ModelSpec, settings: Settings, created: int) -> LocalEmbeddingModel:
        def load(device: str) -> LocalEmbeddingModel:
            return LocalEmbeddingModel.load(
                spec.name,
                spec.path,
                max_batch_tokens=settings.embed_max_batch_tokens,
                max_wait_us=settings.embed_max_wait_us,
                device=device,
                kernel_binaries=settings.kernel_binaries if device != "cpu" else None,
                created=created,
            )

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
