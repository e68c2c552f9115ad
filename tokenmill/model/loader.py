"""Loads a Hugging Face safetensors checkpoint into DecoderLM.

Checkpoint names map onto our module names; q/k/v and gate/up are concatenated into
fused projections as they load. Every failure names the file and the problem.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator

import torch
from safetensors import safe_open

from tokenmill.attention import AttentionBackend
from tokenmill.config import ModelConfig
from tokenmill.memory import pack_parameters
from tokenmill.model.linear import prepack_bytes, prepack_model, quantize_model, quantize_rows_int8
from tokenmill.model.transformer import DecoderLM

logger = logging.getLogger(__name__)

# checkpoint suffix -> (our suffix, shard index within the fused parameter or None)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\.)")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"model: {index} is not a valid safetensors index: {e}") from e
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise ValueError(f"model: weight file {os.path.join(path, name)} listed in {index} is missing")
        return [os.path.join(path, n) for n in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(path, f) for f in found]
    raise ValueError(f"model: no *.safetensors weight files in {path} (only safetensors checkpoints are supported)")


def _read_ahead(file: str) -> None:
    """Asks the kernel to read the whole file into the page cache now, in large sequential reads:
    safetensors maps the file and the copies would otherwise fault it in a few pages at a time
    (a cold load then runs well below the disk's speed)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return  # safe_open reports it
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _iter_tensors(files: list[str]) -> Iterator[tuple[str, str, torch.Tensor]]:
    for file in files:
        _read_ahead(file)
        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            raise ValueError(f"model: weight file {file} is corrupt or not safetensors: {e}") from e
        with handle:
            for name in handle.keys():
                try:
                    tensor = handle.get_tensor(name)
                except Exception as e:
                    raise ValueError(
                        f"model: cannot read tensor {name!r} from {file} (truncated or corrupt): {e}"
                    ) from e
                yield file, name, tensor


def _progress_bar(files: list[str]):
    from tqdm import tqdm

    total = 0
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as h:
                total += len(list(h.keys()))
        except Exception:
            return None  # _iter_tensors reports the broken file
    return tqdm(total=total, desc="Loading weights", unit="tensor", leave=False)


def _target(cfg: ModelConfig, name: str) -> tuple[str, int | None] | None:
    """Maps a checkpoint tensor name to (our parameter name, shard index); None to skip it."""
    if _IGNORED.search(name):
        return None
    if name == "score.weight":  # a sequence classifier's head
        return ("score.weight", None) if cfg.labels else None
    if not name.startswith(("model.", "lm_head.")):
        # A bare decoder's tensors (Qwen3-Embedding's, whatever its config.json's architecture).
        name = "model." + name
    if name == "model.embed_tokens.weight":
        return "embed_tokens.weight", None
    if name == "model.norm.weight":
        return "norm.weight", None
    if name == "lm_head.weight":
        if cfg.label_token_ids:  # (classifier_from_token: its rows become the head)
            return "score.weight", None
        return (None if cfg.tie_word_embeddings or not cfg.has_lm_head else ("lm_head.weight", None))
    m = _LAYER.match(name)
    if m:
        layer, module, kind = m.groups()
        if module in _FUSED:
            ours, shard = _FUSED[module]
            return f"layers.{layer}.{ours}.{kind}", shard
        return f"layers.{layer}.{module}.{kind}", None
    return "", None  # unknown: reported by the caller


def label_rows(head: torch.Tensor, token_ids: tuple[int, ...]) -> torch.Tensor:
    """classifier_from_token's head from an LM head [vocab, hidden]: the tokens' rows; two tokens
    [no, yes] make one, yes minus no (its logit's sigmoid is yes's 2-way softmax, vLLM's
    from_2_way_softmax)."""
    rows = head[list(token_ids)].float()
    return rows[1:] - rows[:1] if len(token_ids) == 2 else rows


def load_model(cfg: ModelConfig, backend: AttentionBackend, device: torch.device, dtype: torch.dtype,
               max_positions: int, progress: bool = False, quantization: str | None = None,
               prepack: bool | None = False, reserved_bytes: int = 0, load_format: str = "auto") -> DecoderLM:
    """The model of config.json with its checkpoint's weights; with load_format "dummy" random ones,
    made on the device with no checkpoint read (vLLM's --load-format dummy: benchmarks of large
    shapes need only a config.json)."""
    files = checkpoint_files(cfg.path) if load_format != "dummy" else []
    bar = _progress_bar(files) if progress else None
    with torch.device("meta"):
        model = DecoderLM(cfg, backend, max_positions)
    model = model.to(dtype)
    # Quantized as it loads: each checkpoint tensor goes into its int8 weight and scales, so the
    # load's peak is the int8 model, not the float one (a 7B model: 7 GB rather than 28 in float32).
    # Random (dummy) weights are made in float first and quantized as before.
    quantize_as_loaded = quantization is not None and load_format != "dummy"
    if quantize_as_loaded:
        quantize_model(model, quantization, empty=True)
    model = model.to_empty(device=device)
    # On CPU the weights live in one huge-page region (tokenmill/memory.py), in the order a decode
    # step reads them; they are read from the checkpoint (and quantized) straight into it.
    packed_now = device.type == "cpu" and (quantization is None or quantize_as_loaded)
    if packed_now:
        pack_parameters(list(model.parameters()), copy=False)
    if load_format == "dummy":
        _dummy_weights(model, device)
    params = dict(model.named_parameters())
    loaded: set[tuple[str, int | None]] = set()
    unexpected: list[str] = []
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shard_sizes = {"qkv_proj": [q, kv, kv], "gate_up_proj": [cfg.intermediate_size] * 2}

    with torch.no_grad():
        for file, name, tensor in _iter_tensors(files):
            if bar is not None:
                bar.update(1)
            target = _target(cfg, name)
            if target is None:
                continue
            pname, shard = target
            if pname not in params:
                unexpected.append(name)
                continue
            param = params[pname]
            if pname == "score.weight" and name != "score.weight":
                tensor = label_rows(tensor, cfg.label_token_ids)
            dest = param
            if shard is not None:
                sizes = shard_sizes[pname.split(".")[-2]]
                dest = param.narrow(0, sum(sizes[:shard]), sizes[shard])
            if not tensor.dtype.is_floating_point or tensor.element_size() < 2:  # int8/uint8/float8: quantized
                raise ValueError(f"model: tensor {name!r} in {file} is {tensor.dtype}, not a float type: "
                                 f"pre-quantized checkpoints are not supported")
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ValueError(
                    f"model: tensor {name!r} in {file} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dest.shape)} from config.json"
                )
            if dest.dtype == torch.int8:  # (a row is an output channel: a fused shard's rows quantize alone)
                q8, scale = quantize_rows_int8(tensor.to(dest.device, dtype))  # (on the device: fast on a GPU)
                dest.copy_(q8)
                scales = params[pname.removesuffix(".weight") + ".scale"]
                if shard is not None:
                    scales = scales.narrow(0, sum(sizes[:shard]), sizes[shard])
                scales.copy_(scale)
            else:
                dest.copy_(tensor.to(dtype))
            loaded.add((pname, shard))
    if bar is not None:
        bar.close()
    if cfg.label_token_ids and ("score.weight", None) not in loaded and load_format != "dummy":
        # Tied embeddings: the head's rows are the embedding table's (quantized already, maybe).
        emb = model.embed_tokens
        ids = list(cfg.label_token_ids)
        rows = emb.weight[ids].float() * (emb.scale[ids, None] if emb.scale is not None else 1.0)
        with torch.no_grad():
            params["score.weight"].copy_(label_rows(rows, tuple(range(len(ids)))))  # (the rows are taken already)
        loaded.add(("score.weight", None))

    expected: set[tuple[str, int | None]] = set()
    for pname in params:
        if pname.endswith(".scale"):  # (an int8 weight's scales: filled with it)
            continue
        kind = pname.split(".")[-2]
        if kind in shard_sizes:
            expected.update((pname, i) for i in range(len(shard_sizes[kind])))
        else:
            expected.add((pname, None))
    missing = sorted({p for p, _ in expected - loaded}) if load_format != "dummy" else []
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"model: {len(missing)} weights missing from {', '.join(files)}: {shown}")
    if unexpected:
        logger.warning("ignored %d unexpected tensors, e.g. %s", len(unexpected), unexpected[:3])
    model.rotary.reset_table()
    if quantization is not None and not quantize_as_loaded:
        quantize_model(model, quantization)
    if device.type == "cpu":
        if not packed_now:  # quantized weights replaced the loaded ones: pack those
            pack_parameters(list(model.parameters()))
        _prepack(model, prepack, reserved_bytes)
        model.reset_fused()
    model.requires_grad_(False)  # inference only
    model.eval()
    return model


@torch.no_grad()
def _dummy_weights(model: DecoderLM, device: torch.device) -> None:
    """Norm weights 1, every other weight N(0, 0.02) from a fixed seed: activations keep a sane scale,
    so a step costs what it would with real weights."""
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.fill_(1.0)
        elif p.dtype.is_floating_point:
            p.normal_(0.0, 0.02, generator=gen)
        else:
            p.zero_()


def _prepack(model: DecoderLM, prepack: bool | None, reserved_bytes: int) -> None:
    """oneDNN copies of the float32/bfloat16 weights (linear.prepack_model); None decides by memory:
    the copy may take a quarter of the RAM available beyond `reserved_bytes` (an explicit KV cache
    size). A KV cache sized as a share of available RAM is sized after the copy exists."""
    if prepack is False:
        return
    nbytes = prepack_bytes(model)
    if not nbytes:
        return
    if prepack is None:
        from tokenmill.engine.model_runner import available_ram_bytes

        avail = max(available_ram_bytes() - reserved_bytes, 0)
        if nbytes > avail // 4:
            logger.info("weights not prepacked: the copy (%.0f MiB) would take more than a quarter of the "
                        "available RAM (%.0f MiB)", nbytes / 2**20, avail / 2**20)
            return
    count = prepack_model(model)
    logger.info("prepacked %d weights for oneDNN (%.0f MiB)", count, nbytes / 2**20)
