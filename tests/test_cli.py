"""The `tokenmill` command line: --help everywhere, generate, chat through stdin, eval-demo."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
