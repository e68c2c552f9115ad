"""lm-evaluation-harness, unchanged, against a real `tokenmill serve`: a multiple-choice task from a
local YAML and JSONL through `local-completions` (echo + logprobs scoring) gives the accuracy and
the per-choice loglikelihoods of lm-eval's own transformers backend on the same weights."""

from __future__ import annotations

import json
import os

import pytest

if os.environ.get("CI"):  # CI installs the `clients` extra: a missing lm-eval must fail there, not skip
    import lm_eval
else:
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the `clients` extra")

from tests.server_utils import ServerProcess  # noqa: E402

TASK = """task: tm_colors
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

QUESTIONS = [
    ("The sky on a clear day is", [" blue", " green", " loud"], 0),
    ("Grass is usually", [" purple", " green", " square"], 1),
    ("Snow is", [" white", " hot", " sour"], 0),
    ("Two plus two is", [" three", " four", " nine"], 1),
    ("A dog says", [" moo", " quack", " woof"], 2),
    ("The opposite of up is", [" down", " left", " sideways"], 0),
    ("Fire is", [" cold", " wet", " hot"], 2),
    ("The sun rises in the", [" east", " west", " sea"], 0),
]


def _evaluate(tmp_path, model: str, model_args: str):
    from lm_eval.tasks import TaskManager

    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    data = tmp_path / "colors.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tasks / "tm_colors.yaml").write_text(TASK.format(data=data))
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["tm_colors"],
                                  task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                                  batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    acc = out["results"]["tm_colors"]["acc,none"]
    lls = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in out["samples"]["tm_colors"]}
    return acc, lls


def test_local_completions_matches_transformers(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    srv = ServerProcess(model_dir, "--kv-cache-memory", "0.0625", log_path=str(tmp_path / "server.log"))
    try:
        name = os.path.basename(model_dir)
        served_acc, served = _evaluate(
            tmp_path, "local-completions",
            f"model={name},base_url={srv.base_url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={model_dir},tokenized_requests=True,num_concurrent=1,max_retries=1")
    finally:
        assert srv.stop() == 0
    ref_acc, ref = _evaluate(tmp_path, "hf", f"pretrained={model_dir},dtype=float32,device=cpu")
    assert served_acc == ref_acc
    assert sorted(served) == sorted(ref) == list(range(len(QUESTIONS)))
    for doc in ref:
        assert served[doc] == pytest.approx(ref[doc], abs=1e-4)
