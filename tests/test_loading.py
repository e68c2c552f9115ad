"""Checkpoint loading: families, config styles, dtypes, and clear errors for broken folders."""

import json
import os
import shutil

import pytest
import torch

from tests.models import ARCH_CONFIGS, hf_greedy, hf_model, make_model
from tokenmill import LLM, SamplingParams
from tokenmill.config import ModelConfig

KV = dict(kv_cache_memory_bytes=2 * 2**20)


def _edit_config(path, fn):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    fn(cfg)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def test_transformers_4_style_config(tmp_path):
    """rope_theta + rope_scaling at the top level, as transformers 4.x writes them."""
    path = make_model(str(tmp_path / "m"), "llama", tokenizer=False)
    ref = hf_greedy(hf_model(path), [5, 6, 7, 8], 12)

    def to_v4(cfg):
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        cfg["rope_scaling"] = params
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")

    _edit_config(path, to_v4)
    mc = ModelConfig.from_pretrained(path)
    assert mc.rope.rope_type == "llama3" and mc.rope.factor == 8.0
    llm = LLM(path, **KV)
    out = llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(max_tokens=12, temperature=0))
    assert out[0].outputs[0].token_ids == ref


def test_folder_without_tokenizer(tmp_path):
    path = make_model(str(tmp_path / "m"), "qwen3", tokenizer=False)
    llm = LLM(path, **KV)
    assert llm.get_tokenizer() is None
    out = llm.generate({"prompt_token_ids": [3, 4, 5]}, SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.outputs[0].token_ids) >= 1 and out.outputs[0].text == ""
    with pytest.raises(ValueError, match="^prompt: .*no tokenizer"):
        llm.generate("text needs a tokenizer")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(tmp_path, dtype):
    path = make_model(str(tmp_path / "m"), "llama", tokenizer=False)
    llm = LLM(path, dtype=dtype, **KV)
    assert llm.engine.runner.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    out = llm.generate({"prompt_token_ids": list(range(3, 40))},
                       SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0))[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(path)(torch.tensor([list(range(3, 40))])).logits[0], -1)
    for pos in range(1, 37):
        lp = out.prompt_logprobs[pos][pos + 3].logprob
        assert lp == pytest.approx(float(ref[pos - 1, pos + 3]), abs=0.1)


def test_auto_dtype_is_float32_on_cpu(tmp_path):
    path = make_model(str(tmp_path / "m"), "llama", tokenizer=False)
    _edit_config(path, lambda c: c.update(dtype="bfloat16"))
    llm = LLM(path, device="cpu", **KV)
    assert llm.engine.dtype == torch.float32


def test_unsupported_architecture(tmp_path):
    path = make_model(str(tmp_path / "m"), "llama", tokenizer=False)
    _edit_config(path, lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel.*config.json"):
        LLM(path, **KV)


def test_sliding_window_configs_read_as_transformers_reads_them():
    """Qwen2's max_window_layers defaults to transformers' 28 (not every layer); a window that is
    not a positive integer, or layer_types of the wrong length, is refused naming config.json."""
    from tokenmill.config import _parse_sliding_windows

    qwen = {"sliding_window": 8, "use_sliding_window": True}
    assert _parse_sliding_windows(qwen, "Qwen2ForCausalLM", 30) == (None,) * 28 + (8, 8)
    assert _parse_sliding_windows({**qwen, "max_window_layers": 1}, "Qwen2ForCausalLM", 3) == (None, 8, 8)
    assert _parse_sliding_windows({"sliding_window": 16.0, "layer_types": ["full_attention", "sliding_attention"]},
                                  "Qwen3ForCausalLM", 2) == (None, 16)
    for raw, match in [({"sliding_window": -1}, "sliding_window must be a positive integer, got -1"),
                       ({"sliding_window": 4.5}, "positive integer, got 4.5"),
                       ({"sliding_window": 4, "layer_types": ["sliding_attention"]}, "layer_types has 1 entries")]:
        with pytest.raises(ValueError, match=match + ".*config.json"):
            _parse_sliding_windows(raw, "MistralForCausalLM", 2, "/m")


def test_missing_config(tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        LLM(str(tmp_path), **KV)


def test_missing_shard_named(tmp_path):
    path = make_model(str(tmp_path / "m"), "llama", tokenizer=False, shard="60KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        victim = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(os.path.join(path, victim))
    with pytest.raises(ValueError, match=f"{victim}.*missing"):
        LLM(path, **KV)


def test_no_weights_at_all(tmp_path):
    path = make_model(str(tmp_path / "m"), "llama", tokenizer=False)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LLM(path, **KV)


def test_corrupt_weight_file_named(tmp_path):
    path = make_model(str(tmp_path / "m"), "llama", tokenizer=False)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        LLM(path, **KV)


def test_truncated_weight_file_named(tmp_path):
    path = make_model(str(tmp_path / "m"), "llama", tokenizer=False)
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    with open(file, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(path, **KV)


def test_shape_mismatch_named(tmp_path):
    path = make_model(str(tmp_path / "m"), "llama", tokenizer=False)
    _edit_config(path, lambda c: c.update(intermediate_size=96))
    pattern = r"tensor .model.layers.0.mlp.\w+_proj.weight. in .*model.safetensors has shape .*128.*expected .*96"
    with pytest.raises(ValueError, match=pattern):
        LLM(path, **KV)


def test_missing_tensor_named(tmp_path):
    src = make_model(str(tmp_path / "src"), "llama", tokenizer=False)
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(src, "model.safetensors"))
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    dst = str(tmp_path / "dst")
    shutil.copytree(src, dst)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*layers.1.post_attention_layernorm"):
        LLM(dst, **KV)


def test_kv_cache_too_small_says_what_to_change(tmp_path):
    path = make_model(str(tmp_path / "m"), "llama", tokenizer=False)
    with pytest.raises(ValueError, match="max_model_len=1024.*MiB.*kv_cache_memory_bytes.*max_model_len"):
        LLM(path, kv_cache_memory_bytes=100_000)


def test_bad_engine_settings(tmp_path):
    path = make_model(str(tmp_path / "m"), "llama", tokenizer=False)
    with pytest.raises(ValueError, match="block_size"):
        LLM(path, block_size=10, **KV)
    with pytest.raises(ValueError, match="dtype"):
        LLM(path, dtype="int3", **KV)
    with pytest.raises(TypeError, match="unknown settings"):
        LLM(path, not_a_setting=1)


@pytest.mark.parametrize("tied", [False, True])
def test_prepacked_weights(tmp_path, tied, monkeypatch):
    """On by default where the copy fits: every projection and the LM head (the token embedding when
    tied) get oneDNN copies, and a batch of more rows than the kernel takes gives the unpacked
    engine's logits to rounding and its greedy tokens. Off when asked, for int8 weights, and when
    the copy would take more than a quarter of the available RAM."""
    from tokenmill.model.linear import Linear, can_prepack

    path = make_model(str(tmp_path / "m"), "llama", tokenizer=False, tie_word_embeddings=tied)
    CPU_KV = dict(device="cpu", **KV)  # (prepacking is for CPU runners: "auto" is CUDA on a GPU machine)
    if not can_prepack(torch.zeros(2, 2)):
        pytest.skip("no oneDNN here")
    on, off = LLM(path, **CPU_KV), LLM(path, prepack_weights=False, **CPU_KV)
    model = on.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed is not None for m in linears)
    assert (model.embed_tokens.packed is not None) == tied
    assert all(m.packed is None for m in off.engine.runner.model.modules() if hasattr(m, "packed"))
    prompts = [{"prompt_token_ids": list(range(3 + i, 30 + 2 * i))} for i in range(12)]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    a, b = on.generate(prompts, sp), off.generate(prompts, sp)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for px, py in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            for tok, lp in px.items():
                assert lp.logprob == pytest.approx(py[tok].logprob, abs=1e-4)
    int8 = LLM(path, quantization="int8", **CPU_KV).engine.runner.model
    assert all(m.packed is None for m in int8.modules() if hasattr(m, "packed"))
    import tokenmill.engine.model_runner as mr

    monkeypatch.setattr(mr, "available_ram_bytes", lambda: 1000)
    assert all(m.packed is None for m in LLM(path, **CPU_KV).engine.runner.model.modules() if hasattr(m, "packed"))
    forced = LLM(path, prepack_weights=True, **CPU_KV).engine.runner.model
    assert all(m.packed is not None for m in forced.modules() if isinstance(m, Linear))


def test_dummy_weights_need_only_config_json(model_dir, tmp_path):
    """load_format="dummy" (vLLM's): random weights made on the device from config.json alone, the
    same for the same seed; norms at 1 and the rest N(0, 0.02), so activations keep their scale."""
    shutil.copy(os.path.join(model_dir, "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LLM(str(tmp_path), kv_cache_memory_bytes=2**20)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs, models = [], []
    for _ in range(2):
        llm = LLM(str(tmp_path), load_format="dummy", kv_cache_memory_bytes=2**20)
        outs.append(llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, params)[0].outputs[0].token_ids)
        models.append(llm.engine.runner.model)
    assert outs[0] == outs[1] and len(outs[0]) == 6
    named = dict(models[0].named_parameters())
    assert torch.equal(named["norm.weight"], torch.ones_like(named["norm.weight"]))
    w = named["layers.0.mlp.down_proj.weight"].float()
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_a_dummy_model_is_sized_from_its_shape(tmp_path, arch):
    """A model pool budgets a dummy-weight model (no checkpoint to read) by its shape's parameters:
    what transformers counts for the same config, and what the checkpoint's tensors would take."""
    from transformers import AutoModelForCausalLM

    from tokenmill.config import EngineConfig
    from tokenmill.server.pool import _weight_bytes

    path = make_model(str(tmp_path / "m"), arch)
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert ModelConfig.from_pretrained(path).num_parameters == hf.num_parameters()
    dummy = tmp_path / "dummy"
    dummy.mkdir()
    shutil.copy(os.path.join(path, "config.json"), dummy / "config.json")
    real = _weight_bytes(EngineConfig(model=path, device="cpu", prepack_weights=False))
    assert real > 0 and _weight_bytes(EngineConfig(model=str(dummy), device="cpu", prepack_weights=False,
                                                   load_format="dummy")) == real


def test_an_int8_model_is_sized_as_int8(tmp_path):
    """The pool's estimate of an int8 model (and its draft, quantized alike) before it loads: one
    byte a matrix value and a scale a row, within 10% of what it takes once loaded (it was sized
    as float32, four times that, and refused under budgets it fits)."""
    from tokenmill import LLM
    from tokenmill.config import EngineConfig
    from tokenmill.server.pool import _weight_bytes

    # (a short context: the rotary tables, which the estimate leaves out, stay small beside the weights)
    path = make_model(str(tmp_path / "m"), "llama", hidden_size=128, intermediate_size=256,
                      max_position_embeddings=64)
    real = LLM(path, quantization="int8", kv_cache_memory_bytes=2**22).engine.runner.resident_weight_bytes
    est = _weight_bytes(EngineConfig(model=path, device="cpu", quantization="int8"))
    assert abs(est - real) < 0.1 * real
    spec = {"method": "draft_model", "model": path, "num_speculative_tokens": 2}
    assert _weight_bytes(EngineConfig(model=path, device="cpu", quantization="int8",
                                      speculative_config=spec)) == 2 * est
