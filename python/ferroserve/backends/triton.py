"""Models served by an NVIDIA Triton Inference Server, through `tritonclient` (gRPC asyncio by
default, HTTP asyncio with `protocol = "http"`).

Two model shapes, chosen by the `[[models]]` entry's `kind`:

* `embedding`: an encoder taking token ids. We tokenize with our own `tokenizer.json`, pad the
  batch, send `input_ids` + `attention_mask` (INT64) and receive FP32 token states [B,T,H]
  (pooled here: masked mean or CLS) or already pooled vectors [B,H] (`pooling = "none"`).
* `chat`: a TensorRT-LLM-style decoupled model (`text_input` BYTES, `max_tokens` INT32 and
  whichever sampling inputs it declares in), streaming `text_output` one response per token
  over gRPC `ModelStreamInfer`. Chat messages become one prompt string: each message rendered
  with `prompt_template` ("{role}: {content}\\n"), then `prompt_suffix` ("assistant:").

Options are the `[[models]]` table's `options = {...}`; see `TritonModelOptions`. Example ::

    [[backends]]
    name = "triton-a"
    kind = "triton"
    base_url = "gpu-box:8001"          # gRPC; "http://gpu-box:8000" with protocol = "http"

    [[models]]
    name = "minilm-triton"
    backend = "triton-a"
    kind = "embedding"
    upstream_model = "minilm"          # Triton's model name (default: name)
    options = { tokenizer = "/models/all-MiniLM-L6-v2", max_tokens = 256, pooling = "mean" }

    [[models]]
    name = "llama-trt"
    backend = "triton-a"
    kind = "chat"
    upstream_model = "ensemble"
    options = { tokenizer = "/models/llama/tokenizer.json", prompt_template = "<|{role}|>{content}\\n" }
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

from ferroserve.backends.base import (
    DOWN, HEALTHY, Admitted, Backend, BackendInfo, BackendStats, ChatRequest, Delta, EmbeddingResult, EmbedRequest,
    Event, Failed, Finished, Unavailable, estimate_tokens,
)
from ferroserve.config import BackendSpec, ConfigError, ModelSpec
from ferroserve.errors import ApiError


# The SamplingParams fields a generation model may take as inputs, and TensorRT-LLM's names.
DEFAULT_SAMPLING_INPUTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "random_seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


class TritonModelOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The `options` of a Triton `[[models]]` entry. Tensor names default to the usual ones
    (HF/ONNX BERT exports for embeddings, TensorRT-LLM's ensemble for generation)."""

    # Our tokenizer: a tokenizer.json or a folder holding one. Required for embeddings; for
    # generation it makes prompt token counts exact (else about four bytes per token).
    tokenizer: str | None = None
    # Embeddings: inputs are truncated to this many tokens, special tokens included.
    max_tokens: int = 512
    input_ids: str = "input_ids"
    attention_mask: str | None = "attention_mask"  # None: the model takes ids only
    token_type_ids: str | None = None  # some BERT exports want zeros here
    output: str = "last_hidden_state"
    # "mean" (masked) or "cls" pool token states [B,T,H]; "none": the output is pooled [B,H].
    pooling: Literal["mean", "cls", "none"] = "mean"
    normalize: bool = True
    # Generation.
    text_input: str = "text_input"
    max_tokens_input: str = "max_tokens"
    text_output: str = "text_output"
    # A BOOL input set to true when the model declares it (TensorRT-LLM's `stream`).
    stream_input: str | None = "stream"
    # SamplingParams field -> input name; sent only when the model declares that input.
    sampling_inputs: dict[str, str] = msgspec.field(default_factory=lambda: dict(DEFAULT_SAMPLING_INPUTS))
    # An output with the number of tokens in each response (default: one token per response).
    token_count_output: str | None = None
    prompt_template: str = "{role}: {content}\n"
    prompt_suffix: str = "assistant:"
    # Completion length when the request does not give max_tokens.
    default_max_tokens: int = 256
    model_version: str = ""


def parse_options(spec: ModelSpec) -> TritonModelOptions:
    try:
        opts = msgspec.convert(spec.options, type=TritonModelOptions)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"model {spec.name}: invalid Triton options: {exc}") from None
    unknown = set(opts.sampling_inputs) - set(DEFAULT_SAMPLING_INPUTS)
    if unknown:
        raise ConfigError(
            f"model {spec.name}: sampling_inputs keys must be among {sorted(DEFAULT_SAMPLING_INPUTS)}, got {sorted(unknown)}")
    if opts.max_tokens < 2 or opts.default_max_tokens < 1:
        raise ConfigError(f"model {spec.name}: max_tokens must be at least 2 and default_max_tokens at least 1")
    return opts


# Tokenizer -----------------------------------------------------------------------------------------
class Tokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` package), used the way our engine uses
    it: special tokens added, truncated to `max_tokens` with the closing special token kept."""

    def __init__(self, path: str, max_tokens: int) -> None:
        try:
            from tokenizers import Tokenizer as HfTokenizer
        except ImportError:
            raise ConfigError("Triton models with a `tokenizer` option need the `tokenizers` package "
                              "(pip install 'ferroserve[triton]')") from None
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(f"tokenizer {path}: no tokenizer.json there")
        try:
            self.inner = HfTokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises plain Exception
            raise ConfigError(f"tokenizer {file}: {exc}") from None
        self.inner.no_padding()
        self.inner.enable_truncation(max_tokens)
        self.max_tokens = max_tokens
        # The special tokens around a sequence (e.g. [CLS] … [SEP]), for pre-tokenized input.
        probe = self.inner.encode("a")
        first = probe.sequence_ids.index(0) if 0 in probe.sequence_ids else len(probe.ids)
        last = len(probe.sequence_ids) - 1 - probe.sequence_ids[::-1].index(0) if 0 in probe.sequence_ids else first - 1
        self.prefix, self.suffix = probe.ids[:first], probe.ids[last + 1:]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.inner.encode_batch(texts, add_special_tokens=True)]

    def wrap_ids(self, ids: list[int]) -> list[int]:
        """Pre-tokenized input gets the special tokens (unless already there) and the truncation."""
        p, s = self.prefix, self.suffix
        if p and s and len(ids) >= len(p) + len(s) and ids[:len(p)] == p and ids[len(ids) - len(s):] == s:
            ids = ids[len(p):len(ids) - len(s)]
        room = max(0, self.max_tokens - len(p) - len(s))
        return [*p, *ids[:room], *s]

    def count(self, text: str) -> int:
        return len(self.inner.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids, skip_special_tokens=False)


# Connection: one client per [[backends]] entry ---------------------------------------------------
class TritonConnection:
    """The client of one `[[backends]]` Triton, shared by its models (kept in the registry's
    `pools`). The asyncio client belongs to the loop that made it, so a new loop gets a new one."""

    def __init__(self, backend: BackendSpec) -> None:
        self.backend = backend
        self.protocol = backend.protocol
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Consecutive connection failures; DOWN while > 0 (until a request succeeds).
        self.connection_failures = 0

    def client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client, self._loop = self._make(), loop
        return self._client

    def _make(self) -> Any:
        url = self.backend.base_url
        if self.protocol == "http":
            import tritonclient.http.aio as httpclient

            ssl = url.startswith("https://")
            return httpclient.InferenceServerClient(
                url=url.split("://", 1)[-1].rstrip("/"), ssl=ssl, conn_timeout=self.backend.read_timeout_s,
                conn_limit=self.backend.max_concurrent)
        import tritonclient.grpc.aio as grpcclient

        ssl = url.startswith("https://") or url.startswith("grpcs://")
        return grpcclient.InferenceServerClient(url=url.split("://", 1)[-1].rstrip("/"), ssl=ssl)

    def succeeded(self) -> None:
        self.connection_failures = 0

    def failed(self, exc: BaseException) -> Unavailable | ApiError:
        """Maps a client error to ours (and counts connection failures for health)."""
        mapped = map_error(exc, self.backend)
        if mapped is None:
            raise exc  # not a client or network error: a bug, not an unavailable backend
        error, connection = mapped
        if connection:
            self.connection_failures += 1
        return error

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


# gRPC status names (both clients report them as "StatusCode.X" or HTTP codes as text).
_CONNECTION_STATUSES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}
_UNAVAILABLE_HTTP = {"408", "429", "500", "502", "503", "504"}


def map_error(exc: BaseException, backend: BackendSpec) -> tuple[Unavailable | ApiError, bool] | None:
    """(our error, whether it means the server could not be reached), None for exceptions that
    are neither client nor network errors. INVALID_ARGUMENT (HTTP 400) is the request's fault;
    everything else is Unavailable (another candidate may serve)."""
    import grpc

    where = f"Triton {backend.name} ({backend.base_url})"
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        status, message = exc.code().name, exc.details() or str(exc)
    elif type(exc).__name__ == "InferenceServerException":
        status = str(exc.status() or "").removeprefix("StatusCode.")  # type: ignore[attr-defined]
        message = exc.message()  # type: ignore[attr-defined]
    elif isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return Unavailable(f"{where}: timed out"), True
    elif isinstance(exc, OSError) or type(exc).__module__.startswith("aiohttp"):
        return Unavailable(f"{where}: {type(exc).__name__}: {exc}"), True
    else:
        return None
    if status in ("INVALID_ARGUMENT", "400"):
        return ApiError(400, f"{where} rejected the request: {message}", code="triton_invalid_argument"), False
    connection = status in _CONNECTION_STATUSES or status in ("503", "504") or (
        not status and ("connect" in message.lower() or "unavailable" in message.lower()))
    http = int(status) if status.isdigit() and status in _UNAVAILABLE_HTTP else None
    return Unavailable(f"{where}: {status or 'error'}: {message}", status=http), connection


def create(spec: ModelSpec, backend: BackendSpec, pools: dict) -> Backend:
    """The backend object for one `[[models]]` entry on a Triton `[[backends]]` entry; `pools`
    is the registry's dict shared by all backends (one connection per backend name)."""
    opts = parse_options(spec)
    key = ("triton", backend.name)
    conn = pools.get(key)
    if conn is None:
        conn = pools[key] = TritonConnection(backend)
    tokenizer = Tokenizer(opts.tokenizer, opts.max_tokens) if opts.tokenizer else None
    if spec.kind == "embedding":
        if tokenizer is None:
            raise ConfigError(f"model {spec.name}: a Triton embedding model needs options.tokenizer "
                              "(a tokenizer.json or the folder holding it)")
        return TritonEmbeddingModel(spec, backend, conn, opts, tokenizer)
    if spec.kind == "chat":
        if backend.protocol != "grpc":
            raise ConfigError(f"model {spec.name}: Triton generation streams over gRPC (decoupled models); "
                              f"backend {backend.name} uses protocol {backend.protocol!r}")
        return TritonGenerationModel(spec, backend, conn, opts, tokenizer)
    raise ConfigError(f"model {spec.name}: a Triton model's kind must be chat or embedding, got {spec.kind!r}")


# Shared parts ---------------------------------------------------------------------------------------
_request_ids = itertools.count(1)


class TritonModel(Backend):
    capabilities: list[str] = []

    def __init__(self, spec: ModelSpec, backend: BackendSpec, conn: TritonConnection, opts: TritonModelOptions,
                 tokenizer: Tokenizer | None) -> None:
        self.name = spec.name
        self.spec, self.backend, self.conn, self.opts, self.tok = spec, backend, conn, opts, tokenizer
        self.model_name = spec.upstream_model or spec.name
        self.in_flight = 0
        self._config: dict | None = None
        self._config_lock: asyncio.Lock | None = None

    def info(self) -> BackendInfo:
        return BackendInfo(
            kind="triton", backend=self.backend.name, capabilities=list(self.capabilities), device=self.backend.base_url,
            dimensions=self._dimensions(), owned_by=self.spec.owned_by,
            input_usd_per_million_tokens=self.spec.input_usd_per_million_tokens,
            output_usd_per_million_tokens=self.spec.output_usd_per_million_tokens,
        )

    def _dimensions(self) -> int | None:
        return None

    def health(self) -> str:
        return DOWN if self.conn.connection_failures > 0 else HEALTHY

    def stats(self) -> BackendStats:
        return BackendStats(running=self.in_flight)

    def stop(self) -> None:
        self._config = None

    async def model_config(self) -> dict:
        """The model's configuration (read once): inputs and outputs by name, max_batch_size."""
        if self._config is not None:
            return self._config
        try:
            client = self.conn.client()
            if self.conn.protocol == "http":  # the HTTP client answers JSON already
                raw = await client.get_model_config(self.model_name, self.opts.model_version)
            else:
                raw = await client.get_model_config(self.model_name, self.opts.model_version, as_json=True)
        except Exception as exc:
            raise self.conn.failed(exc) from None
        self.conn.succeeded()
        config = raw.get("config", raw)  # gRPC wraps it in {"config": ...}
        self._config = {
            "max_batch_size": int(config.get("max_batch_size", 0)),
            "inputs": {i["name"]: i for i in config.get("input", [])},
            "outputs": {o["name"]: o for o in config.get("output", [])},
            "decoupled": bool(config.get("model_transaction_policy", {}).get("decoupled", False)),
        }
        return self._config

    def _input(self, name: str, array: np.ndarray, declared: dict | None) -> Any:
        """An InferInput of the right client module, cast to the model's declared type."""
        mod = self._client_module()
        dtype = (declared or {}).get("data_type", "").removeprefix("TYPE_")
        if dtype == "STRING":
            dtype = "BYTES"
        if dtype and dtype != "BYTES":
            array = array.astype(mod.triton_to_np_dtype(dtype))
        datatype = dtype or mod.np_to_triton_dtype(array.dtype)
        tensor = mod.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        return tensor

    def _client_module(self) -> Any:
        if self.conn.protocol == "http":
            import tritonclient.http as mod
        else:
            import tritonclient.grpc as mod
        return mod


# Embeddings ----------------------------------------------------------------------------------------
class TritonEmbeddingModel(TritonModel):
    capabilities = ["embeddings"]
    tok: Tokenizer

    def _dimensions(self) -> int | None:
        if self._config is None:
            return None
        dims = self._config["outputs"].get(self.opts.output, {}).get("dims", [])
        last = int(dims[-1]) if dims else -1
        return last if last > 0 else None

    def _token_lists(self, request: EmbedRequest) -> list[list[int]]:
        if request.texts is not None:
            return self.tok.encode_batch(request.texts)
        return [self.tok.wrap_ids(list(ids)) for ids in request.token_lists or []]

    def count_embed_tokens(self, request: EmbedRequest) -> int:
        return sum(len(ids) for ids in self._token_lists(request))

    async def embed(self, request: EmbedRequest) -> EmbeddingResult:
        lists = self._token_lists(request)
        if not lists:
            return EmbeddingResult(prompt_tokens=0, vectors=np.zeros((0, 0), np.float32))
        self.in_flight += 1
        try:
            config = await self.model_config()
            chunk = config["max_batch_size"] or len(lists)
            parts = [await self._infer(lists[i:i + chunk], config) for i in range(0, len(lists), chunk)]
        finally:
            self.in_flight -= 1
        vectors = np.concatenate(parts, axis=0)
        if request.dimensions is not None:
            if not 0 < request.dimensions <= vectors.shape[1]:
                raise ApiError(400, f"dimensions must be between 1 and {vectors.shape[1]} for `{self.name}`, "
                                    f"got {request.dimensions}", param="dimensions")
            vectors = vectors[:, :request.dimensions]
            if self.opts.normalize:
                vectors = _normalized(vectors)
        return EmbeddingResult(prompt_tokens=sum(map(len, lists)), vectors=np.ascontiguousarray(vectors, np.float32))

    async def _infer(self, lists: list[list[int]], config: dict) -> np.ndarray:
        o = self.opts
        width = max(map(len, lists))
        ids = np.zeros((len(lists), width), np.int64)
        mask = np.zeros((len(lists), width), np.int64)
        for row, toks in enumerate(lists):
            ids[row, :len(toks)] = toks
            mask[row, :len(toks)] = 1
        declared = config["inputs"]
        inputs = [self._input(o.input_ids, ids, declared.get(o.input_ids))]
        if o.attention_mask:
            inputs.append(self._input(o.attention_mask, mask, declared.get(o.attention_mask)))
        if o.token_type_ids:
            inputs.append(self._input(o.token_type_ids, np.zeros_like(ids), declared.get(o.token_type_ids)))
        outputs = [self._client_module().InferRequestedOutput(o.output)]
        try:
            result = await asyncio.wait_for(
                self.conn.client().infer(self.model_name, inputs, model_version=o.model_version, outputs=outputs),
                self.backend.read_timeout_s)
        except Exception as exc:
            raise self.conn.failed(exc) from None
        self.conn.succeeded()
        states = result.as_numpy(o.output)
        if states is None:
            raise Unavailable(f"Triton model {self.model_name} returned no output {o.output!r}")
        states = states.astype(np.float32, copy=False)
        if o.pooling == "none":
            if states.ndim != 2:
                raise Unavailable(f"Triton model {self.model_name}: pooling = \"none\" expects [B,H] from "
                                  f"{o.output!r}, got shape {list(states.shape)}")
            pooled = states
        else:
            if states.ndim != 3:
                raise Unavailable(f"Triton model {self.model_name}: pooling = {o.pooling!r} expects token states "
                                  f"[B,T,H] from {o.output!r}, got shape {list(states.shape)}")
            if o.pooling == "cls":
                pooled = states[:, 0, :]
            else:
                weights = mask[:, :states.shape[1], None].astype(np.float32)
                pooled = (states * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)
        return _normalized(pooled) if o.normalize else pooled


def _normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


# Generation ----------------------------------------------------------------------------------------
class TritonGenerationModel(TritonModel):
    capabilities = ["chat", "completions"]

    def _prompt(self, request: ChatRequest) -> str:
        if request.messages is None:
            p = request.prompt
            if isinstance(p, list):
                if self.tok is None:
                    raise ApiError(400, f"`{self.name}` takes text prompts only (no tokenizer configured)", param="prompt")
                return self.tok.decode(p)
            return p or ""
        parts = []
        for m in request.messages:
            if isinstance(m.content, str):
                content = m.content
            else:
                if any(kind != "text" for kind, _ in m.content):
                    raise ApiError(400, f"`{self.name}` takes text content only", param="messages")
                content = "".join(text for _, text in m.content)
            # role first, so a "{role}" inside the content stays as written
            parts.append(self.opts.prompt_template.replace("{role}", m.role).replace("{content}", content))
        return "".join(parts) + self.opts.prompt_suffix

    def count_tokens(self, request: ChatRequest) -> int:
        if self.tok is None:
            return estimate_tokens(request)
        return self.tok.count(self._prompt(request))

    def generate(self, request: ChatRequest) -> AsyncIterator[Event]:
        return self._generate(request)

    def _inputs(self, request: ChatRequest, prompt: str, max_tokens: int, config: dict) -> list:
        o, p, declared = self.opts, request.params, config["inputs"]
        batch = [1] if config["max_batch_size"] > 0 else []

        def tensor(name: str, value: Any, dtype: Any) -> Any:
            dims = [max(1, int(d)) for d in declared[name].get("dims", [1])]
            return self._input(name, np.full(batch + dims, value, dtype=dtype), declared[name])

        inputs = [tensor(o.text_input, prompt.encode(), object)]
        if o.max_tokens_input in declared:
            inputs.append(tensor(o.max_tokens_input, max_tokens, np.int32))
        if o.stream_input and o.stream_input in declared:
            inputs.append(tensor(o.stream_input, True, np.bool_))
        for field, name in o.sampling_inputs.items():
            value = getattr(p, field)
            if name not in declared or value is None or (field == "top_k" and value == 0):
                continue
            inputs.append(tensor(name, value, np.float64 if isinstance(value, float) else np.int64))
        return inputs

    async def _generate(self, request: ChatRequest) -> AsyncIterator[Event]:
        p = request.params
        if p.n != 1:
            yield Failed(ApiError(400, f"`{self.name}` (Triton) generates one choice per request", param="n"))
            return
        if p.logprobs:
            yield Failed(ApiError(400, f"`{self.name}` (Triton) does not return logprobs", param="logprobs"))
            return
        if p.response_format is not None:
            yield Failed(ApiError(400, f"`{self.name}` (Triton) cannot enforce response_format (structured output)",
                                  param="response_format"))
            return
        if request.tools:
            yield Failed(ApiError(400, f"`{self.name}` (Triton) cannot call tools", param="tools"))
            return
        try:
            prompt = self._prompt(request)
            prompt_tokens = self.count_tokens(request)
        except ApiError as exc:
            yield Failed(exc)
            return
        max_tokens = p.max_tokens or self.opts.default_max_tokens
        self.in_flight += 1
        stream = None
        try:
            try:
                config = await self.model_config()
            except (Unavailable, ApiError) as exc:
                yield Failed(exc)
                return
            if self.opts.text_input not in config["inputs"]:
                yield Failed(Unavailable(f"Triton model {self.model_name} has no input {self.opts.text_input!r}"))
                return
            inputs = self._inputs(request, prompt, max_tokens, config)
            grpc = self._client_module()
            outputs = [grpc.InferRequestedOutput(self.opts.text_output)]
            if self.opts.token_count_output and self.opts.token_count_output in config["outputs"]:
                outputs.append(grpc.InferRequestedOutput(self.opts.token_count_output))
            message = {"model_name": self.model_name, "model_version": self.opts.model_version, "inputs": inputs,
                       "outputs": outputs, "request_id": f"ferroserve-{next(_request_ids)}"}

            async def requests() -> AsyncIterator[dict]:
                # One request, then the write side closes: Triton ends the stream after the
                # request's last response (its final flag or the end of the stream: done).
                yield message

            stream = self.conn.client().stream_infer(requests())
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            stops = [s for s in p.stop or [] if s]
            held = ""  # text not yet sent: it might begin a stop sequence
            completion_tokens = 0
            admitted = False
            reason = None
            while reason is None:
                try:
                    result, error = await asyncio.wait_for(stream.__anext__(), self.backend.read_timeout_s)
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    yield Failed(self.conn.failed(exc))
                    return
                if error is not None:
                    # The model refused or failed this request inside the stream.
                    yield Failed(self.conn.failed(error))
                    return
                self.conn.succeeded()
                if not admitted:
                    admitted = True
                    yield Admitted(prompt_tokens=prompt_tokens)
                final = _final_flag(result)
                piece = _text(result.as_numpy(self.opts.text_output))
                if piece is not None:
                    completion_tokens += _token_count(result, self.opts.token_count_output, piece)
                    held += decoder.decode(piece)
                    text, held, stopped = _split_stop(held, stops)
                    if text:
                        yield Delta(index=0, text=text)
                    if stopped:
                        reason = "stop"
                        held = ""
                if completion_tokens >= max_tokens and reason is None:
                    reason = "length"
                if final:
                    break
            if not admitted:
                yield Admitted(prompt_tokens=prompt_tokens)
            if reason != "stop":  # what was held back for a stop sequence goes out after all
                held += decoder.decode(b"", final=True)
                if held:
                    yield Delta(index=0, text=held)
            yield Finished(index=0, reason=reason or "stop", completion_tokens=completion_tokens,
                           prompt_tokens=prompt_tokens)
        finally:
            self.in_flight -= 1
            if stream is not None:
                # Unless the stream ended by itself (then this is a no-op), the consumer left
                # (aclose, task cancelled), a stop sequence ended it early or it failed:
                # cancelling the gRPC call makes Triton cancel the request.
                stream.cancel()


def _final_flag(result: Any) -> bool:
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


def _text(array: np.ndarray | None) -> bytes | None:
    if array is None or array.size == 0:
        return None
    return b"".join(x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1))


def _token_count(result: Any, output: str | None, piece: bytes) -> int:
    if output:
        counts = result.as_numpy(output)
        if counts is not None and counts.size:
            return int(counts.reshape(-1)[0])
    return 1 if piece else 0


def _split_stop(text: str, stops: list[str]) -> tuple[str, str, bool]:
    """(text to send now, text to hold back, whether a stop sequence was reached)."""
    if not stops:
        return text, "", False
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    # Hold back the longest tail that could still grow into a stop sequence.
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if s.startswith(text[len(text) - k:]):
                keep = k
                break
    return text[:len(text) - keep], text[len(text) - keep:], False


__all__ = ["TritonModelOptions", "create", "map_error"]
