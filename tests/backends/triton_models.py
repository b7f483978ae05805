"""A real Triton Inference Server (nvidia-pytriton's bundled one) with the models the Triton
backend tests drive. Runs inside .venv-triton (pytriton pins numpy<2), started by
test_triton.py:

    .venv-triton/bin/python tests/backends/triton_models.py --http-port P --grpc-port P2 \\
        --metrics-port P3 --workspace DIR --weights model.safetensors --events events.jsonl

Models:
* `minilm` (pytriton-bound): all-MiniLM-L6-v2's BERT computed here in numpy from the
  safetensors weights: INT64 input_ids, attention_mask [B,T] -> FP32 last_hidden_state [B,T,384].
* `minilm_pooled` (pytriton-bound): the same, mean-pooled and normalised: sentence_embedding [B,384].
* `gen`: a decoupled generator, TensorRT-LLM-shaped (text_input BYTES, max_tokens INT32, optional
  temperature/top_p FP32 -> text_output BYTES), streaming the prompt's words in reverse order,
  one word per response, `--delay-s` apart. It is a plain Triton Python-backend model loaded
  through the model-repository API rather than a pytriton-bound function: pytriton 0.7.0 never
  tells its infer functions that a request was cancelled (they run to the end; Triton only
  drops the responses), while a Python-backend model can ask `request.is_cancelled()` as
  TensorRT-LLM does. Each request appends JSON lines to --events: its inputs, then
  "cancelled" (with the responses sent) or "done".
"""

from __future__ import annotations

import argparse
import json
import math
import struct
from pathlib import Path

import numpy as np

# The Python-backend model of `gen` (runs in Triton's Python stub process).
GEN_MODEL_PY = r'''
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.events = params["events_path"]["string_value"]
        self.delay_s = float(params["delay_s"]["string_value"])

    def _log(self, **event):
        with open(self.events, "a") as f:
            f.write(json.dumps(event) + "\n")

    def execute(self, requests):
        for request in requests:
            self._run(request)
        return None

    def _run(self, request):
        sender = request.get_response_sender()
        names = [t.name() for t in request.inputs()]
        prompt = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0].decode()
        limit_tensor = pb_utils.get_input_tensor_by_name(request, "max_tokens")
        limit = int(limit_tensor.as_numpy().reshape(-1)[0]) if limit_tensor is not None else 16
        temperature = pb_utils.get_input_tensor_by_name(request, "temperature")
        self._log(event="start", id=request.request_id(), inputs=sorted(names), prompt=prompt, max_tokens=limit,
                  temperature=None if temperature is None else float(temperature.as_numpy().reshape(-1)[0]))
        if limit <= 0:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("max_tokens must be positive")),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        words = prompt.split()[::-1][:limit]
        for sent, word in enumerate(words):
            time.sleep(self.delay_s)
            if request.is_cancelled():
                self._log(event="cancelled", id=request.request_id(), sent=sent)
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            out = pb_utils.Tensor("text_output", np.array([(word + " ").encode()], dtype=np.object_))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
        self._log(event="done", id=request.request_id(), sent=len(words))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''


# MiniLM BERT in numpy -------------------------------------------------------------------------------
def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The safetensors layout: u64 little-endian header size, a JSON header, raw tensor bytes."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        out[name] = np.frombuffer(raw, dtype=dtypes[meta["dtype"]], count=(end - begin) // np.dtype(dtypes[meta["dtype"]]).itemsize,
                                  offset=8 + size + begin).reshape(meta["shape"])
    return out


_erf = np.vectorize(math.erf, otypes=[np.float64])


class MiniLM:
    """BertModel forward (6 layers, 12 heads, exact-erf GELU, LayerNorm eps 1e-12) in float64."""

    def __init__(self, weights: Path, heads: int = 12, eps: float = 1e-12) -> None:
        w = {k.removeprefix("bert."): v.astype(np.float64) for k, v in read_safetensors(weights).items()
             if v.dtype != np.int64}
        self.w, self.heads, self.eps = w, heads, eps
        self.layers = sum(1 for k in w if k.endswith("attention.self.query.weight"))

    def _norm(self, x: np.ndarray, prefix: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.eps) * self.w[prefix + ".weight"] + self.w[prefix + ".bias"]

    def _dense(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ self.w[prefix + ".weight"].T + self.w[prefix + ".bias"]

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        w = self.w
        b, t = ids.shape
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t][None] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = self._norm(x, "embeddings.LayerNorm")
        hidden = x.shape[-1]
        d = hidden // self.heads
        bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9)
        for i in range(self.layers):
            p = f"encoder.layer.{i}"

            def split(y: np.ndarray) -> np.ndarray:
                return y.reshape(b, t, self.heads, d).transpose(0, 2, 1, 3)

            q, k, v = (split(self._dense(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + bias
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attn = (scores / scores.sum(-1, keepdims=True)) @ v
            attn = attn.transpose(0, 2, 1, 3).reshape(b, t, hidden)
            x = self._norm(x + self._dense(attn, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
            h = self._dense(x, f"{p}.intermediate.dense")
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
            x = self._norm(x + self._dense(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        return x


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("--http-port", "--grpc-port", "--metrics-port"):
        ap.add_argument(name, type=int, required=True)
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--delay-s", type=float, default=0.05)
    args = ap.parse_args()

    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    bert = MiniLM(Path(args.weights))

    @batch
    def token_states(input_ids: np.ndarray, attention_mask: np.ndarray) -> dict:
        return {"last_hidden_state": bert(input_ids, attention_mask).astype(np.float32)}

    @batch
    def sentence_embedding(input_ids: np.ndarray, attention_mask: np.ndarray) -> dict:
        states = bert(input_ids, attention_mask)
        m = attention_mask[..., None].astype(np.float64)
        pooled = (states * m).sum(1) / np.maximum(m.sum(1), 1.0)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        return {"sentence_embedding": pooled.astype(np.float32)}

    ids_in = [Tensor(name="input_ids", shape=(-1,), dtype=np.int64), Tensor(name="attention_mask", shape=(-1,), dtype=np.int64)]
    config = TritonConfig(http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                          http_address="127.0.0.1", grpc_address="127.0.0.1")
    # restricted_endpoints=[]: pytriton 0.7 otherwise guards model-repository (the load of `gen`)
    # and statistics behind a generated token.
    with Triton(config=config, workspace=args.workspace,
                security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        triton.bind("minilm", token_states, inputs=ids_in,
                    outputs=[Tensor(name="last_hidden_state", shape=(-1, 384), dtype=np.float32)],
                    config=ModelConfig(max_batch_size=16))
        triton.bind("minilm_pooled", sentence_embedding, inputs=ids_in,
                    outputs=[Tensor(name="sentence_embedding", shape=(384,), dtype=np.float32)],
                    config=ModelConfig(max_batch_size=16))
        triton.run()
        load_generator(args)
        triton.serve()


def load_generator(args: argparse.Namespace) -> None:
    import tritonclient.grpc as grpcclient

    config = {
        "name": "gen", "backend": "python", "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        "input": [
            {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]},
            {"name": "max_tokens", "data_type": "TYPE_INT32", "dims": [1]},
            {"name": "temperature", "data_type": "TYPE_FP32", "dims": [1], "optional": True},
            {"name": "top_p", "data_type": "TYPE_FP32", "dims": [1], "optional": True},
        ],
        "output": [{"name": "text_output", "data_type": "TYPE_STRING", "dims": [1]}],
        "instance_group": [{"kind": "KIND_CPU", "count": 2}],
        "parameters": {"events_path": {"string_value": args.events}, "delay_s": {"string_value": str(args.delay_s)}},
    }
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{args.grpc_port}")
    client.load_model("gen", config=json.dumps(config), files={"file:1/model.py": GEN_MODEL_PY.encode()})
    client.close()


if __name__ == "__main__":
    main()
