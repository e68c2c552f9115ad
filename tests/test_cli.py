"""The `tokenmill` command line: --help everywhere, generate, chat through stdin, eval-demo."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.server_utils import ROOT
from tokenmill.cli import build_parser, main

COMMANDS = [[], ["serve"], ["generate"], ["chat"], ["eval-demo"], ["bench"], ["bench", "throughput"],
            ["bench", "server-overhead"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "tokenmill")
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tokenmill")
    if cmd in (["serve"], ["generate"], ["chat"], ["eval-demo"]):
        assert "--model" in out


def test_help_as_a_process():
    r = subprocess.run([sys.executable, "-m", "tokenmill.cli", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0
    for cmd in ("serve", "generate", "chat", "eval-demo", "bench"):
        assert cmd in r.stdout


def _engine_flags(model_dir: str) -> list[str]:
    return ["--model", model_dir, "--kv-cache-memory", "0.01"]


def test_generate_prints_the_completion(model_dir, llm, capsys):
    from tokenmill import SamplingParams

    want = llm.generate("Hello world", SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].text
    assert main(["generate", "Hello world", "--max-tokens", "12", *_engine_flags(model_dir)]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["generate", "Hello world", "--max-tokens", "12", "--stream", *_engine_flags(model_dir)]) == 0
    assert capsys.readouterr().out == want + "\n"
    chat_want = llm.chat([{"role": "user", "content": "Hello world"}],
                         SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].text
    assert main(["generate", "Hello world", "--chat", "--max-tokens", "12", *_engine_flags(model_dir)]) == 0
    assert capsys.readouterr().out == chat_want + "\n"


def test_generate_reports_bad_input(model_dir, capsys):
    assert main(["generate", "x", "--max-tokens", "0", *_engine_flags(model_dir)]) == 2
    assert "max_tokens" in capsys.readouterr().err
    assert main(["generate", "x", "--model", "/nonexistent/folder"]) == 2
    assert "/nonexistent/folder" in capsys.readouterr().err


def test_chat_through_stdin_keeps_history(model_dir, llm):
    from tokenmill import SamplingParams

    params = SamplingParams(max_tokens=10, temperature=0)
    first = llm.chat([{"role": "user", "content": "Hello"}], params)[0].outputs[0].text
    second = llm.chat([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                       {"role": "user", "content": "The quick brown fox"}], params)[0].outputs[0].text
    env = dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "tokenmill.cli", "chat", "--max-tokens", "10", *_engine_flags(model_dir)],
                       input="Hello\nThe quick brown fox\n/exit\nnot read\n", capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{first}\n{second}\n"


def test_eval_demo_runs_on_any_chat_model(model_dir, capsys, tmp_path):
    out_json = tmp_path / "eval.json"
    assert main(["eval-demo", "--num-questions", "4", "--show", "1", "--json", str(out_json),
                 *_engine_flags(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "accuracy: " in out and "/4 = " in out and "time: " in out and "The weather today is" in out
    assert out_json.exists()


def test_serve_on_a_busy_port_fails_before_loading(model_dir):
    """The port is bound before the weights load: a taken one is a clear error at once, with no
    "loading" log line, no "serving on" line, and exit status 2."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "tokenmill.cli", "serve", *_engine_flags(model_dir),
                            "--port", str(port)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"--port {port}: 127.0.0.1:{port} is already in use" in r.stderr
    assert "loading" not in r.stderr and "serving" not in r.stderr


def test_max_model_len_beyond_the_model_is_refused(tmp_path, capsys):
    """vLLM's rule: max_model_len above max_position_embeddings (times a linear RoPE factor) is
    an error naming the override; with the override it loads; a shorter draft model is refused."""
    from tests.models import make_model
    from tokenmill import LLM

    path = make_model(str(tmp_path / "m"), "llama", tokenizer=False, max_position_embeddings=256)
    kv = dict(kv_cache_memory_bytes=2**22)
    with pytest.raises(ValueError, match=r"max_model_len=512 exceeds the model's context of 256 positions.*"
                                         r"--allow-long-max-model-len"):
        LLM(path, max_model_len=512, **kv)
    assert LLM(path, max_model_len=512, allow_long_max_model_len=True, **kv).engine.max_model_len == 512
    assert LLM(path, **kv).engine.max_model_len == 256
    scaled = make_model(str(tmp_path / "s"), "llama", tokenizer=False, max_position_embeddings=256,
                        rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert LLM(scaled, **kv).engine.max_model_len == 512
    with pytest.raises(ValueError, match="context of 512 positions.*linear RoPE scaling"):
        LLM(scaled, max_model_len=513, **kv)
    big = make_model(str(tmp_path / "big"), "llama", tokenizer=False, max_position_embeddings=1024)
    with pytest.raises(ValueError, match="max_model_len=1024 exceeds the draft model's context of 256"):
        LLM(big, speculative_config={"method": "draft_model", "model": path, "num_speculative_tokens": 2}, **kv)
    capsys.readouterr()
    r = main(["generate", "--model", path, "--max-model-len", "300", "--kv-cache-memory", "0.01", "hi"])
    assert r == 2 and "--allow-long-max-model-len" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--device", "foo"], "device: 'foo' is not a device"),
    (["--kv-cache-memory", "inf"], "--kv-cache-memory: must be a positive number"),
    (["--kv-cache-memory", "nan"], "--kv-cache-memory: must be a positive number"),
    (["--attention-backend", "triton"], "attention_backend: 'triton' runs on CUDA"),
    (["--tokenizer", "/nonexistent/tok"], "tokenizer: /nonexistent/tok holds no tokenizer"),
])
def test_bad_engine_flags_are_one_line_errors(model_dir, capsys, monkeypatch, flags, message):
    """Values that crashed with a traceback, or started an engine that then failed every request."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if "triton" in flags and torch.cuda.is_available():
        pytest.skip("triton runs on this machine's GPU")
    assert main(["generate", "x", *_engine_flags(model_dir), *flags]) == 2
    assert message in capsys.readouterr().err


def test_bad_serve_and_cli_settings_are_one_line_errors(model_dir, tmp_path, capsys):
    for args, message in [
        (["serve", *_engine_flags(model_dir), "--port", "70000"], "--port: must be in [0, 65535]"),
        (["serve", *_engine_flags(model_dir), "--max-body-size", "0"], "--max-body-size: must be a positive"),
        (["serve", *_engine_flags(model_dir), "--memory-budget", "nan"], "--memory-budget: must be a positive"),
        (["eval-demo", *_engine_flags(model_dir), "--num-questions", "-3"], "--num-questions must be >= 1"),
        (["chat", *_engine_flags(model_dir), "--temperature", "-1"], "temperature"),  # (exit 0 before)
    ]:
        assert main(args) == 2, args
        assert message in capsys.readouterr().err, args
    doc = tmp_path / "models.yaml"
    doc.write_text(f"models:\n  - {{name: a, path: {model_dir}}}\n  - {{name: b, path: {model_dir}}}\n"
                   "tiers:\n  - {name: t, route: {policy: cascade, small: [a], strong: b, threshold: -1}}\n")
    assert main(["serve", "--models", str(doc)]) == 2  # (a list where a model's name goes: a TypeError before)
    assert "small" in capsys.readouterr().err
    doc.write_text(f"models:\n  - {{name: a, path: {model_dir}}}\n  - {{name: b, path: {model_dir}}}\n"
                   "tiers:\n  - {name: ' ', route: {policy: cascade, small: a, strong: b, threshold: -1}}\n")
    assert main(["serve", "--models", str(doc)]) == 2
    assert "tiers[0].name: must be a non-empty string" in capsys.readouterr().err
    # A model that would start on disk is checked at startup, not at its first request (which would
    # first push the active model out).
    doc.write_text(f"models:\n  - {{name: a, path: {model_dir}}}\n  - {{name: b, path: {model_dir}, "
                   "max_model_len: 10000000}\n")
    assert main(["serve", "--models", str(doc)]) == 2
    assert "models[1]: max_model_len=10000000 exceeds the model's context" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--replica", "127.0.0.1:5"], "--replica: '127.0.0.1:5' is not a replica's base URL"),
    (["--replica", "http://127.0.0.1:99999"], "has a port that is not a number"),
    (["--replica", "http://127.0.0.1:5", "--health-timeout", "0"], "--health-timeout: must be a positive"),
    (["--replica", "http://127.0.0.1:5", "--health-interval", "-1"], "--health-interval: must be a positive"),
    (["--replica", "http://127.0.0.1:5", "--kv-full", "nan"], "--kv-full: a KV cache usage in (0, 1]"),
    (["--replica", "http://127.0.0.1:5", "--max-body-size", "0"], "--max-body-size: must be a positive"),
])
def test_bad_router_settings_are_one_line_errors(flags, message, capsys):
    """Settings that started a router unable to serve (every replica down, or a check every 0 s)."""
    assert main(["router", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_local_replica_that_refuses_its_settings_is_a_one_line_error(model_dir, tmp_path, capsys):
    """`router --replicas N` with serve flags a replica refuses: the replica's own error, not a traceback."""
    assert main(["router", "--port", "0", "--replicas", "1", "--replica-log-dir", str(tmp_path),
                 *_engine_flags(model_dir), "--device", "foo"]) == 2
    err = capsys.readouterr().err
    assert "replica 0 did not start: device: 'foo' is not a device" in err, err
    assert "Traceback" not in err
