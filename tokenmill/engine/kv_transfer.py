"""KV cache transfer between engines: what prefill/decode disaggregation moves.

A prefill worker computes a prompt's KV; a decode worker takes it into its own prefix cache
under the same block keys (block_manager.hash_block: sha256 chains over token ids and the cache
salt, the same in every process), so the decode worker's request finds the prompt cached and
computes only its last block. Nothing else changes: a block found by key is used exactly as a
block the worker computed itself, so outputs are what a colocated run gives (tested
token-exact), and a transfer that fails or arrives partly costs only the recomputation.

The wire format is a safetensors file (a well-kept, dependency-free format every ML stack
reads; its header holds shapes and dtypes, and checks them): tensor `kv` of shape
(layers, 2, blocks, block_size, kv_heads, head_dim), `draft_kv` likewise for a draft model's
cache, and metadata naming the format, the model's fingerprint, the block size and the blocks'
keys (hex, comma separated). The fingerprint keeps KV out of a cache it does not belong in: a
block's key names its tokens, not the weights that computed it, so KV of another checkpoint
(a fine-tune with the same shapes) would be found by key and silently change every answer
built on it. The fingerprint hashes the checkpoint files' sizes and sampled contents, the
dtype, the weight quantization and the block size.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field

import torch

FORMAT = "tokenmill-kv-1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SAMPLES = 16  # chunks read from each weight file (plus its first and last bytes)
_SAMPLE_BYTES = 65536


class KVTransferError(ValueError):
    """A payload that cannot go into this engine's cache (another model, a bad shape, ...)."""


def checkpoint_digest(folder: str) -> str:
    """A digest of a checkpoint folder's weights, without reading gigabytes: every weight file's
    name and size; in a safetensors file its header (names, shapes, offsets) and, from every tensor,
    its first and last 4 KiB and 4 evenly spaced 4 KiB samples (a fine-tune that changed only some
    tensors, a merged LoRA, frozen layers, changes sampled bytes of those tensors); in other
    formats 16 evenly spaced 64 KiB samples of the file."""
    h = hashlib.sha256()
    names = sorted(n for n in os.listdir(folder) if n.endswith(_WEIGHT_SUFFIXES)) if os.path.isdir(folder) else []
    for name in names:
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        h.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            for off, n in _samples(f, size, name.endswith(".safetensors")):
                f.seek(off)
                h.update(f.read(n))
    config = os.path.join(folder, "config.json")
    if os.path.isfile(config):
        with open(config, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _samples(f, size: int, safetensors: bool) -> list[tuple[int, int]]:
    """(offset, length) of the byte ranges checkpoint_digest reads from one file."""
    if safetensors and size >= 8:
        (n,) = struct.unpack("<Q", f.read(8))
        if 0 < n <= min(size - 8, 100 * 2**20):
            f.seek(8)
            try:
                header = json.loads(f.read(n))
            except ValueError:
                header = None
            if isinstance(header, dict):
                out = [(0, 8 + n)]
                for name in sorted(k for k in header if k != "__metadata__"):
                    begin, end = (header[name].get("data_offsets") or (0, 0)) if isinstance(header[name], dict) \
                        else (0, 0)
                    begin, end = 8 + n + int(begin), 8 + n + int(end)
                    span = max(0, end - begin)
                    for i in range(6):  # first, last, and 4 between: 4 KiB each
                        off = begin + (span - 4096) * i // 5 if span > 4096 else begin
                        out.append((off, min(4096, span)))
                return out
    offsets = {0, max(0, size - _SAMPLE_BYTES)}
    offsets.update(size * i // (_SAMPLES + 1) for i in range(1, _SAMPLES + 1))
    return [(off, _SAMPLE_BYTES) for off in sorted(offsets)]


def fingerprint(folder: str, dtype: torch.dtype, quantization: str | None, block_size: int,
                draft_folder: str | None = None, load_format: str = "auto", seed: str = "") -> str:
    """What KV must match to move between engines: the checkpoint (checkpoint_digest), dtype,
    quantization, block size, the draft model's checkpoint, and for random weights (load_format
    dummy) what drew them (the seed and the device's generator)."""
    weights = checkpoint_digest(folder) if load_format != "dummy" else f"dummy:{seed}"
    parts = [FORMAT, weights, str(dtype), str(quantization), str(block_size), load_format]
    if draft_folder is not None:
        parts.append("draft:" + checkpoint_digest(draft_folder))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@dataclass
class KVPayload:
    """Blocks of KV and their prefix-cache keys, in prompt order; prefix_keys: the keys of the blocks
    before them that the receiver has already (skip_blocks), sent without their KV."""

    keys: list[bytes]
    kv: torch.Tensor  # (layers, 2, blocks, block_size, kv_heads, head_dim)
    draft_kv: torch.Tensor | None
    fingerprint: str
    block_size: int
    prefix_keys: list[bytes] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.keys)


def gather(caches: list[torch.Tensor], blocks: list[int]) -> torch.Tensor:
    """The blocks' KV from every layer's cache, (layers, 2, blocks, block_size, heads, dim) on the
    host: a layer at a time into one host tensor (pinned from a GPU), so a device whose cache fills
    it needs room for one layer's blocks, not the whole payload twice."""
    if not caches:
        raise KVTransferError("the KV cache is not allocated")
    c0 = caches[0]
    idx = torch.tensor(blocks, dtype=torch.long, device=c0.device)
    out = torch.empty((len(caches), c0.shape[0], len(blocks), *c0.shape[2:]), dtype=c0.dtype,
                      pin_memory=c0.device.type == "cuda")
    for layer, cache in enumerate(caches):
        out[layer].copy_(cache.index_select(1, idx))
    return out


def scatter(caches: list[torch.Tensor], blocks: list[int], kv: torch.Tensor) -> None:
    """Writes kv (layers, 2, n, ...) into the given blocks of every layer's cache."""
    idx = torch.tensor(blocks, dtype=torch.long, device=caches[0].device)
    for layer, cache in enumerate(caches):
        cache.index_copy_(1, idx, kv[layer].to(cache.device, non_blocking=True))


def encode(p: KVPayload) -> bytes:
    from safetensors.torch import save

    tensors = {"kv": p.kv.contiguous()}
    if p.draft_kv is not None:
        tensors["draft_kv"] = p.draft_kv.contiguous()
    meta = {"format": FORMAT, "fingerprint": p.fingerprint, "block_size": str(p.block_size),
            "keys": ",".join(k.hex() for k in p.keys), "prefix_keys": ",".join(k.hex() for k in p.prefix_keys)}
    return save(tensors, metadata=meta)


def decode(data: bytes) -> KVPayload:
    """A payload from its bytes; KVTransferError for anything that is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if len(data) < 8:
        raise KVTransferError("not a KV payload: too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100 * 2**20:
        raise KVTransferError("not a KV payload: bad header length")
    try:
        header = json.loads(data[8:8 + n])
        meta = header.get("__metadata__") or {}
        tensors = load(data)
    except (ValueError, UnicodeDecodeError, SafetensorError, AttributeError) as e:
        raise KVTransferError(f"not a KV payload: {e}") from None
    if meta.get("format") != FORMAT:
        raise KVTransferError(f"not a KV payload of format {FORMAT!r} (got {meta.get('format')!r})")
    try:
        keys = [bytes.fromhex(k) for k in meta.get("keys", "").split(",")] if meta.get("keys") else []
        prefix = [bytes.fromhex(k) for k in meta["prefix_keys"].split(",")] if meta.get("prefix_keys") else []
        block_size = int(meta.get("block_size", ""))
    except ValueError:
        raise KVTransferError("a KV payload's keys or block size are malformed") from None
    if any(len(k) != 32 for k in keys + prefix):
        raise KVTransferError("a KV payload's keys must be 32-byte sha256 digests")
    kv = tensors.get("kv")
    if kv is None or kv.dim() != 6 or kv.shape[1] != 2 or kv.shape[2] != len(keys):
        raise KVTransferError("a KV payload's `kv` must be (layers, 2, blocks, block_size, heads, dim), one block "
                              "per key")
    draft = tensors.get("draft_kv")
    if draft is not None and (draft.dim() != 6 or draft.shape[2] != len(keys)):
        raise KVTransferError("a KV payload's `draft_kv` must hold one block per key")
    # (here, on the thread that decodes, not in check_fits on the engine's: a pass over the payload
    # there would stall every running sequence for as long)
    for t in (kv, draft):
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise KVTransferError("the KV holds NaN or infinite values")
    return KVPayload(keys, kv, draft, str(meta.get("fingerprint", "")), block_size, prefix)


def check_fits(p: KVPayload, caches: list[torch.Tensor], draft_caches: list[torch.Tensor], fp: str,
               block_size: int) -> None:
    """KVTransferError unless the payload was made by this model for a cache laid out as this one
    (its values were checked by decode: payloads come from bytes)."""
    if p.fingerprint != fp:
        raise KVTransferError("the KV was computed by another model or configuration (fingerprints differ: the "
                              "checkpoint, dtype, quantization or block size)")
    if p.block_size != block_size:
        raise KVTransferError(f"block size {p.block_size} differs from this cache's {block_size}")
    want = (len(caches), *caches[0].shape[:1], p.num_blocks, *caches[0].shape[2:])
    if tuple(p.kv.shape) != want or p.kv.dtype != caches[0].dtype:
        raise KVTransferError(f"KV of shape {tuple(p.kv.shape)} {p.kv.dtype} does not fit this cache ({want} "
                              f"{caches[0].dtype})")
    if bool(draft_caches) != (p.draft_kv is not None):
        raise KVTransferError("the payload's draft-model KV does not match this engine's draft model")
    if p.draft_kv is not None:
        dwant = (len(draft_caches), *draft_caches[0].shape[:1], p.num_blocks, *draft_caches[0].shape[2:])
        if tuple(p.draft_kv.shape) != dwant or p.draft_kv.dtype != draft_caches[0].dtype:
            raise KVTransferError("the payload's draft-model KV does not fit this cache")
