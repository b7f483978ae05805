"""Type stubs for the Rust extension (checked against the built module by mypy's stubtest)."""

from os import PathLike
from typing import Any, final

__all__ = ['__version__', 'cpu_isa', 'cpu_isa_levels', 'opencl_devices', 'write_kernel_binaries', 'EmbeddingEngine', 'Vectors', 'ChatEngine', 'InteractiveRequest', 'FerroserveError', 'InvalidRequest', 'ContextLengthExceeded', 'Overloaded', 'EngineDead', 'ModelLoadError', 'DeviceError']
__version__: str

def cpu_isa() -> str: ...
def cpu_isa_levels() -> list[str]: ...
def opencl_devices() -> list[dict[str, Any]]: ...
def write_kernel_binaries(kind: str, path: str | PathLike[str], device: int, out_dir: str | PathLike[str]) -> list[str]: ...

class FerroserveError(Exception):
    param: str | None  # the OpenAI request parameter at fault, when the engine knows it
class InvalidRequest(FerroserveError): ...
class ContextLengthExceeded(FerroserveError): ...
class Overloaded(FerroserveError): ...
class EngineDead(FerroserveError): ...
class ModelLoadError(FerroserveError): ...
class DeviceError(FerroserveError): ...

@final
class InteractiveRequest:
    """An interactive request in flight (batch work on every engine waits while one is)."""
    def __new__(cls) -> InteractiveRequest: ...
    def close(self) -> None: ...
    @staticmethod
    def in_flight() -> int: ...

@final
class Vectors:
    """One request's vectors: a read-only (rows, dim) float32 buffer (buffer protocol;
    `numpy.asarray` views it without a copy). Only the engine makes them (`drain()`)."""
    def __len__(self) -> int: ...

@final
class EmbeddingEngine:
    def __new__(
        cls,
        path: str | PathLike[str],
        max_batch_tokens: int = 16384,
        max_wait_us: int = 1000,
        device: str = "cpu",
        kernel_binaries: str | PathLike[str] | None = None,
        batch_pass_tokens: int = 2048,
        batch_pass_tokens_busy: int = 16,
    ) -> EmbeddingEngine: ...
    def submit(
        self,
        request_id: int,
        texts: list[str] | None = None,
        token_lists: list[list[int]] | None = None,
        dimensions: int | None = None,
        *,
        priority: str = "interactive",  # or "batch"
    ) -> int: ...
    def count_tokens(self, texts: list[str] | None = None, token_lists: list[list[int]] | None = None) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def fd(self) -> int: ...
    def drain(self) -> list[tuple[Any, ...]]: ...  # (id, True, Vectors, prompt_tokens) | (id, False, kind, message, param)
    @property
    def dim(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def device(self) -> str: ...

@final
class ChatEngine:
    def __new__(
        cls,
        path: str | PathLike[str],
        kv_budget_bytes: int = ...,  # 512 MiB
        max_batch_tokens: int = 512,
        burst_batch_tokens: int = 512,
        max_running: int = 64,
        chat_template: str | None = None,
        numerics: str = "exact",
        device: str = "cpu",
        kernel_binaries: str | PathLike[str] | None = None,
    ) -> ChatEngine: ...
    @property
    def device(self) -> str: ...
    @property
    def device_check(self) -> str | None: ...
    def submit(
        self,
        request_id: int,
        prompt_tokens: list[int],
        *,
        n: int = 1,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        stop: list[str] | None = None,
        ignore_eos: bool = False,
        logprobs: bool = False,
        top_logprobs: int = 0,
        json_schema: str | None = None,
        lark_grammar: str | None = None,
        priority: str = "interactive",  # or "batch"
    ) -> tuple[int, int]: ...
    def abort(self, request_id: int) -> None: ...
    def fd(self) -> int: ...
    def drain(self) -> list[tuple[Any, ...]]: ...
    def encode_chat(
        self,
        messages: list[tuple[str, str | list[tuple[str, str]]]
                       | tuple[str, str | list[tuple[str, str]], list[tuple[str, str, str]], str | None]],
        add_generation_prompt: bool = True,
        tools: list[tuple[str, str | None, str]] | None = None,
    ) -> list[int]: ...
    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...
    def stats(self) -> dict[str, float]: ...
    @property
    def alive(self) -> bool: ...
    @property
    def failure(self) -> str | None: ...
    @property
    def context_length(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def tool_format(self) -> str | None: ...
