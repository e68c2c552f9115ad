"""Embedding models: a bare decoder checkpoint (Qwen3Model, as Qwen3-Embedding ships) pools the
prompt's last token and normalizes it; offline and over /v1/embeddings, against transformers."""

from __future__ import annotations

import base64
import glob
import os
import shutil
import struct

import openai
import pytest
import torch

from tests.models import make_model
from tests.server_utils import ServerProcess
from tokenmill import LLM

KV = dict(kv_cache_memory_bytes=4 * 2**20)


def make_embedding_model(path: str, arch: str = "qwen3", **config) -> str:
    """A tiny random bare decoder with a tokenizer: the causal model's body, saved as AutoModel."""
    from transformers import AutoModel

    causal = make_model(path + "_causal", arch, **config)
    AutoModel.from_pretrained(causal, dtype=torch.float32).save_pretrained(path)
    for f in glob.glob(os.path.join(causal, "*token*")) + glob.glob(os.path.join(causal, "*.txt")):
        shutil.copy(f, path)
    return path


def _reference(path: str, prompts: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.nn.functional.normalize(model(torch.tensor([p])).last_hidden_state[0, -1], dim=0)
                for p in prompts]


@pytest.fixture(scope="module")
def embed_dir(tmp_path_factory):
    return make_embedding_model(str(tmp_path_factory.mktemp("emb") / "qwen3emb"), is_matryoshka=True)


PROMPTS = [[5, 17, 99, 3, 250, 41], [300, 12], list(range(3, 70))]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_offline_embeddings_match_transformers(embed_dir, prefix_caching):
    llm = LLM(embed_dir, enable_prefix_caching=prefix_caching, max_num_batched_tokens=32, **KV)
    assert llm.engine.task == "embed"
    with pytest.raises(ValueError, match="embedding model; use embed"):
        llm.generate([[1, 2, 3]])
    for _ in range(2):  # the second round finds the prompts in the prefix cache
        outs = llm.embed([{"prompt_token_ids": p} for p in PROMPTS])
        for out, ref in zip(outs, _reference(embed_dir, PROMPTS)):
            got = torch.tensor(out.embedding)
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="generative model"):
        LLM(make_model(str(embed_dir) + "_gen", "qwen3", tokenizer=False), **KV).embed([[1, 2, 3]])


def test_sentence_transformers_folder_with_a_causal_config(embed_dir, tmp_path):
    """As Qwen3-Embedding ships: config.json says Qwen3ForCausalLM, the tensors have no `model.`
    prefix and no LM head, and sentence-transformers files say last-token pooling."""
    import json

    path = tmp_path / "st"
    shutil.copytree(embed_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["Qwen3ForCausalLM"]
    cfg["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "config_sentence_transformers.json").write_text("{}")
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True,
                                                                "pooling_mode_mean_tokens": False}))
    llm = LLM(str(path), **KV)
    assert llm.engine.task == "embed"
    for out, ref in zip(llm.embed([{"prompt_token_ids": p} for p in PROMPTS]), _reference(embed_dir, PROMPTS)):
        torch.testing.assert_close(torch.tensor(out.embedding), ref, atol=1e-5, rtol=1e-4)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    with pytest.raises(ValueError, match="pooling_mode_mean_tokens; only last-token pooling"):
        LLM(str(path), **KV)


def test_a_prompt_may_fill_the_context(embed_dir):
    llm = LLM(embed_dir, max_model_len=64, **KV)
    full = list(range(3, 67))
    (out,) = llm.embed([{"prompt_token_ids": full}])
    torch.testing.assert_close(torch.tensor(out.embedding), _reference(embed_dir, [full])[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="exceed max_model_len=64"):
        llm.embed([{"prompt_token_ids": full + [5]}])
    # vLLM's truncate_prompt_tokens: the input's last k tokens (-1: max_model_len of them)
    for k, kept in ((-1, 64), (10, 10)):
        (out,) = llm.embed([{"prompt_token_ids": [9] + full}], truncate_prompt_tokens=k)
        torch.testing.assert_close(torch.tensor(out.embedding), _reference(embed_dir, [full[-kept:]])[0],
                                   atol=1e-5, rtol=1e-4)


def test_task_selection(embed_dir, tmp_path):
    with pytest.raises(ValueError, match="bare decoder without an LM head"):
        LLM(embed_dir, task="generate", **KV)
    causal = make_model(str(tmp_path / "c"), "llama", tokenizer=False)
    llm = LLM(causal, task="embed", **KV)  # a causal LM can embed too, its head unused
    (out,) = llm.embed([[4, 5, 6]])
    assert len(out.embedding) == 64 and abs(sum(x * x for x in out.embedding) - 1) < 1e-5
    # vLLM's shape: EmbeddingRequestOutput.outputs.embedding (it was a RequestOutput whose .outputs
    # was a list of completions, so ported code read an AttributeError)
    assert out.outputs.embedding == out.embedding and out.outputs.hidden_size == 64
    assert out.prompt_token_ids == [4, 5, 6] and out.finished


def test_server_embeddings(embed_dir, tmp_path, model_dir):
    srv = ServerProcess(embed_dir, "--kv-cache-memory", "0.0625", log_path=str(tmp_path / "emb.log"))
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        name = os.path.basename(embed_dir)
        refs = _reference(embed_dir, PROMPTS)
        # The openai client asks for base64 by default and decodes it.
        r = client.embeddings.create(model=name, input=PROMPTS)
        assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens == sum(map(len, PROMPTS))
        compute = r.usage.model_extra["compute"]  # the three inputs' shares of their steps (ops/energy.py)
        assert compute["energy_joules"] > 0 and compute["flops"] > 0 and compute["energy_source"]
        for d, ref in zip(r.data, refs):
            torch.testing.assert_close(torch.tensor(d.embedding), ref, atol=1e-5, rtol=1e-4)
        f = client.embeddings.create(model=name, input=PROMPTS[0], encoding_format="float")
        torch.testing.assert_close(torch.tensor(f.data[0].embedding), refs[0], atol=1e-5, rtol=1e-4)
        raw = client.with_raw_response.embeddings.create(model=name, input="hello there",
                                                          encoding_format="base64").http_response.json()
        b = base64.b64decode(raw["data"][0]["embedding"])
        assert len(struct.unpack(f"<{len(b) // 4}f", b)) == 64
        short = client.embeddings.create(model=name, input=PROMPTS[0], dimensions=16, encoding_format="float")
        torch.testing.assert_close(torch.tensor(short.data[0].embedding),
                                   torch.nn.functional.normalize(refs[0][:16], dim=0), atol=1e-5, rtol=1e-4)
        with pytest.raises(openai.BadRequestError, match="dimensions"):
            client.embeddings.create(model=name, input="x", dimensions=65)
        cut = client.embeddings.create(model=name, input=[[7] * 5 + PROMPTS[0]], encoding_format="float",
                                       extra_body={"truncate_prompt_tokens": len(PROMPTS[0])})
        assert cut.usage.prompt_tokens == len(PROMPTS[0])
        torch.testing.assert_close(torch.tensor(cut.data[0].embedding), refs[0], atol=1e-5, rtol=1e-4)
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            client.completions.create(model=name, prompt="x")
    finally:
        assert srv.stop() == 0
    gen = ServerProcess(model_dir, "--kv-cache-memory", "0.0625", log_path=str(tmp_path / "gen.log"))
    try:
        client = openai.OpenAI(base_url=gen.base_url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="generative model"):
            client.embeddings.create(model=os.path.basename(model_dir), input="x")
    finally:
        assert gen.stop() == 0


def test_embedding_errors_name_input(embed_dir, tmp_path):
    """Many inputs are fine (OpenAI allows 2,048; the generation cap of 256 sequences does not
    apply), an empty input is a 400 naming `input`."""
    srv = ServerProcess(embed_dir, "--kv-cache-memory", "0.0625", log_path=str(tmp_path / "e.log"))
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        name = os.path.basename(embed_dir)
        r = client.embeddings.create(model=name, input=[[5, 6, 7 + i % 50] for i in range(300)])
        assert len(r.data) == 300
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model=name, input=[])
        assert e.value.body["param"] == "input"
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model=name, input=[[1] for _ in range(2049)])
        assert e.value.body["param"] == "input"
    finally:
        assert srv.stop() == 0
