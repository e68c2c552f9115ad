"""The model runner owns every tensor: weights, the KV cache, and each step's batch.

It turns a SchedulerOutput into flat input tensors and attention metadata, runs the
model, computes logits only for the rows that need them (the last token of each chunk
that completes a sequence, plus prompt rows of requests that asked for prompt_logprobs)
and samples. Everything above it is plain-Python bookkeeping.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokenmill.attention import AttentionMetadata, get_attention_backend
from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.cuda_graphs import DecodeGraphs
from tokenmill.engine.cuda_graphs import default_sizes as default_graph_sizes
from tokenmill.engine.input_batch import USES_SPECIAL, InputBatch, Staging
from tokenmill.engine.scheduler import ScheduledSeq, SchedulerOutput
from tokenmill.engine.sequence import Sequence
from tokenmill.engine.spec_decode import DraftModel, verify
from tokenmill.kernels import cpu_ops
from tokenmill.memory import kv_cache_tensors, release_pages
from tokenmill.model import load_model
from tokenmill.outputs import Logprob, PositionLogprobs
from tokenmill.sample import Sampler, SamplingMetadata
from tokenmill.sample.sampler import token_logprobs, topk_logprobs
from tokenmill.structured import fill_bitmask, ids_bitmask

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    # seq_id -> the tokens sampled this step, each with its logprobs entry or None (one token, or
    # with speculative decoding the accepted drafts and one more)
    sampled: dict[int, list[tuple[int, PositionLogprobs | None]]] = field(default_factory=dict)
    # seq_id -> (draft tokens verified, drafts accepted)
    spec: dict[int, tuple[int, int]] = field(default_factory=dict)
    # seq_id -> prompt logprob entries computed this step, in prompt order
    prompt_logprobs: dict[int, list[PositionLogprobs]] = field(default_factory=dict)
    # seq_id -> the pooled, normalized embedding of a prompt an embedding model finished this step
    embeddings: dict[int, list[float]] = field(default_factory=dict)
    # seq_id -> a beam's candidates: the top (token ids, logprobs) of its next-token distribution
    beams: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)


@dataclass
class Launch:
    """A step on its way through the device: launched (forward and LM head queued), sampled
    (sampling and the tokens' copy to the host queued), collected (the host has its tokens)."""

    sched: SchedulerOutput
    inp: StepInputs | None = None
    hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # the LM head's rows, until sampled
    result: StepResult = field(default_factory=StepResult)
    # The sampled token of each of token_seqs, on the device: a pending input of the next step is
    # read from here (token_row).
    tokens: torch.Tensor | None = None
    token_seqs: list[Sequence] = field(default_factory=list)
    deferred: bool = False  # tokens still to be read back into result.sampled (collect)
    host_tokens: torch.Tensor | None = None  # their pinned host copy, in flight until `done`
    done: Any = None  # a CUDA event after the step's last work
    events: tuple[Any, Any] | None = None  # CUDA timing events around the step (launch(timed=True))
    host_seconds: float = 0.0  # host time in launch and sample (the whole step on a CPU)
    pending: bool = False  # its sampled tokens count as pending (async scheduling: left in flight)

    _rows: dict[int, int] | None = field(default=None, repr=False)

    def token_row(self, seq_id: int) -> int | None:
        """The row of `tokens` that holds this sequence's token (made when first asked: only a step
        after this one in flight asks)."""
        if self._rows is None:
            self._rows = {seq.seq_id: i for i, seq in enumerate(self.token_seqs)}
        return self._rows.get(seq_id)

    def device_seconds(self) -> float:
        """The step's time on the device (after collect): its CUDA events' span where timed, else the
        host's time launching and sampling it (a CPU runs the step as it is launched)."""
        if self.events is not None:
            return self.events[0].elapsed_time(self.events[1]) / 1000.0
        return self.host_seconds


@dataclass
class StepInputs:
    order: list[ScheduledSeq]
    rows: list[int] = field(default_factory=list)  # first row of each chunk in `order`
    logit_rows: list[int] = field(default_factory=list)
    sample_seqs: list[Sequence] = field(default_factory=list)
    sample_batch_rows: list[int] = field(default_factory=list)  # each sampled row's row in the persistent batch
    prompt_rows: list[tuple[ScheduledSeq, int, int]] = field(default_factory=list)  # (chunk, first row, count)
    spec_chunks: list[tuple[ScheduledSeq, int]] = field(default_factory=list)  # (chunk with drafts, first row)
    # The rows that go through the LM head, on the device: logit_rows, then every row of each
    # chunk with drafts. Staged with the step's inputs: indexing with a host list would copy from
    # pageable memory, which waits for the device to finish the forward before the LM head can
    # even be queued.
    head_rows: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    meta: AttentionMetadata | None = None


def build_batch(chunks: list[tuple[list[int], int, list[int]]], block_size: int, device: torch.device,
                stage: Staging | None = None, extra: list[int] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Input ids, positions and varlen attention metadata for chunks of (token ids, first position,
    block table), in the given order (single-row chunks must come first). With `stage` the
    tensors reach the device in one asynchronous copy (a tensor made from a host list is a
    blocking copy: the host would wait for the device's queue to drain), and `extra` (int64s)
    comes along as meta.scratch["extra"]."""
    bs = block_size
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    qsl = [0]
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    num_decodes = 0
    for ids, start, table in chunks:
        n = len(ids)
        end = start + n
        input_ids.extend(ids)
        positions.extend(range(start, end))
        slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        qsl.append(qsl[-1] + n)
        seq_lens.append(end)
        tables.append(table[: -(-end // bs)])
        num_decodes += n == 1
    max_blocks = max((len(t) for t in tables), default=1)
    padded = [t + [0] * (max_blocks - len(t)) for t in tables]
    lists = [input_ids, positions, slots, qsl, seq_lens] + ([extra] if extra is not None else [])
    if stage is not None:
        arrays = [np.array(x, np.int64) for x in lists] + [np.array(padded, np.int64).reshape(len(padded), max_blocks)]
        *staged, tables_t = stage(arrays)
    else:
        staged = [torch.tensor(x, dtype=torch.long, device=device) for x in lists]
        tables_t = torch.tensor(padded, dtype=torch.long, device=device).view(len(padded), max_blocks)
    ids_t, pos_t, slots_t, qsl_t, lens_t = staged[:5]
    meta = AttentionMetadata(
        slot_mapping=slots_t,
        query_start_loc=qsl_t,
        seq_lens=lens_t,
        block_tables=tables_t,
        num_decodes=num_decodes,
        max_query_len=max((len(c[0]) for c in chunks), default=0),
        max_seq_len=max(seq_lens, default=0),
        block_size=bs,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
    )
    if extra is not None:
        meta.scratch["extra"] = staged[5]
    return ids_t, pos_t, meta


@torch.inference_mode()
def _compile_decode_variants(model: torch.nn.Module, kv_caches: list[torch.Tensor], backend, dtype: torch.dtype,
                             block_size: int, num_blocks: int, max_model_len: int, device: torch.device) -> list[int]:
    """One eager decode of one sequence per split count of paged_decode (1, 2, 4, ...: as many as
    a context of max_model_len allows), whose first launch compiles it, and a two-token chunk after
    cached context for the prefill kernel. Their key and value land in the cache's first blocks, which hold no sequence
    yet (at start-up; after a park, every sequence is recomputed). Returns the split counts run."""
    block_n = backend.decode_tiling(dtype).block_n
    seen = []
    for want in (2**i for i in range(backend.MAX_SPLITS.bit_length())):  # 1, 2, 4, ... MAX_SPLITS
        context = min(want * block_n, max_model_len)
        blocks = -(-context // block_size)
        if blocks > num_blocks:
            break
        ids, pos, meta = build_batch([([0], context - 1, list(range(blocks)))], block_size, device)
        splits = backend.num_splits(meta, 1, block_n, device)
        if splits in seen:
            continue
        seen.append(splits)
        model(ids, pos, kv_caches, meta)
    # A chunk of two tokens after one cached: paged_attention takes it (TritonAttentionBackend.
    # _kernel_for_prefills), so it is compiled now rather than at the first prefix-cache hit.
    ids, pos, meta = build_batch([([0, 0], 1, [0])], block_size, device)
    model(ids, pos, kv_caches, meta)
    return seen


def _cuda_memory(device: torch.device) -> tuple[int, int, int]:
    """(free device bytes, bytes PyTorch's allocator holds, bytes in live tensors)."""
    return (torch.cuda.mem_get_info(device)[0], torch.cuda.memory_reserved(device),
            torch.cuda.memory_allocated(device))


def available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _module_tensors(model: torch.nn.Module, mkldnn: bool = False) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """(module, attribute, tensor) for every tensor a model holds: parameters, buffers and plain
    tensor attributes (scales; prepacked oneDNN copies with mkldnn)."""
    found = []
    for m in model.modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None:
                found.append((m, name, t))
        for name, t in vars(m).items():  # oneDNN-layout copies exist only on CPU: nothing to move
            if isinstance(t, torch.Tensor) and not name.startswith("_") and (mkldnn or not t.is_mkldnn):
                found.append((m, name, t))
    return found


def _set_tensor(holder: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    if name in holder._parameters:
        holder._parameters[name].data = t
    elif name in holder._buffers:
        holder._buffers[name] = t
    else:
        setattr(holder, name, t)


class ModelRunner:
    def __init__(self, model_config: ModelConfig, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype, max_model_len: int) -> None:
        self.model_config = model_config
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        mc = model_config
        # This process's device memory before the model: what it adds outside PyTorch's allocator
        # (cuBLAS workspaces, kernels) is counted against gpu_memory_utilization (profile_memory).
        self._mem_start = _cuda_memory(device) if device.type == "cuda" else None
        self._profile_kv_bytes = 0  # the profiling step's own KV cache (profile_step)
        backend = config.resolve_attention_backend(device)
        backend_cls = get_attention_backend(backend)
        self.attn_backend = backend_cls(mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.head_dim**-0.5)
        # Decode-only steps through CUDA graphs (engine/cuda_graphs.py): captured before the first
        # step after the KV cache is allocated (warm_up), dropped when the weights or the KV cache go
        # away. Their padded rows write to a spare KV block.
        self.graph_mode = config.resolve_cuda_graphs(device, backend)
        self.spare_blocks = 0 if self.graph_mode == "off" else 1
        self.graph_sizes = config.cuda_graph_sizes or default_graph_sizes(config.max_num_seqs)
        self._graphs: DecodeGraphs | None = None
        if device.type == "cpu":
            cpu_ops()  # built (or loaded) now, so that a fresh build does not stall the first request
        self.model = load_model(mc, self.attn_backend, device, dtype, max_positions=max_model_len,
                                progress=config.load_progress, quantization=config.quantization,
                                load_format=config.load_format,
                                prepack=config.prepack_weights, reserved_bytes=config.kv_cache_memory_bytes or 0)
        self.sampler = Sampler()
        spec = config.speculative_config
        self.drafter = None
        if spec is not None and spec.method == "draft_model":
            self.drafter = DraftModel(spec, mc.vocab_size, config, device, dtype, max_model_len)
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.weights_offloaded = False
        self.kv_released = False  # parked: the KV cache's memory was given back (release_kv_cache)
        self._kv_arena: torch.Tensor | None = None  # the CPU KV cache's mapping
        self._host_weights: dict[int, dict[tuple[int, str], torch.Tensor]] = {}  # offload_weights' copies
        self._warm = True  # False from a KV cache allocation to the next step's warm_up
        self.embed = False  # set by the engine for an embedding model: prompts are pooled, not continued
        # The running sequences' rows (block tables, sampling parameters) kept between steps.
        spec_tokens = spec.num_speculative_tokens if spec is not None else 0
        self.batch = InputBatch(self.block_size, -(-(max_model_len + spec_tokens) // self.block_size) + 1, device,
                                capacity=min(config.max_num_seqs, 256))

    # -- memory -------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def kv_bytes_per_block(self) -> int:
        """Bytes of one block in every layer (and in the draft model's cache, which shares the layout)."""
        mc = self.model_config
        elem = torch.finfo(self.dtype).bits // 8
        per = 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim * elem
        if self.drafter is not None:
            per += self.drafter.kv_bytes_per_block(self.block_size)
        return per

    @torch.inference_mode()
    def profile_step(self) -> None:
        """The largest step the engine may run, on dummy inputs and a KV cache of its own: a prefill
        of max_num_batched_tokens tokens (in sequences of at most max_model_len), then logits for
        max_num_seqs rows (each with its drafts under speculative decoding), their logprobs, and
        top-p sampling of nearly flat logits: every nucleus reaches past the candidates, drawn by the
        GPU kernel, then sorted whole as speculative decoding's verification does (the sampler's
        costliest path).
        The cache lives to the end, so that it is in the peak whichever part peaks."""
        mc, bs = self.model_config, self.block_size
        tokens = self.config.max_num_batched_tokens
        lens = [min(self.max_model_len, tokens - i) for i in range(0, tokens, self.max_model_len)]
        chunks, block = [], 0
        for n in lens:
            need = -(-n // bs)
            chunks.append(([1] * n, 0, list(range(block, block + need))))
            block += need
        elem = torch.finfo(self.dtype).bits // 8
        caches = [torch.zeros((2, block, bs, mc.num_kv_heads, mc.head_dim), dtype=self.dtype, device=self.device)
                  for _ in range(mc.num_layers)]
        chunks.sort(key=lambda c: len(c[0]) != 1)  # single rows first, as build_batch wants
        ids, pos, meta = build_batch(chunks, bs, self.device)
        hidden = self.model(ids, pos, caches, meta)
        spec = self.config.speculative_config
        rows = self.config.max_num_seqs * (1 + (spec.num_speculative_tokens if spec is not None else 0))
        logits = self.model.compute_logits(hidden[torch.arange(rows, device=self.device) % hidden.shape[0]])
        logits = logits.float().uniform_(0, 1e-3)  # nearly flat
        _logprobs = torch.log_softmax(logits, dim=-1)  # alive through sampling, as when logprobs are asked for
        md = SamplingMetadata(
            temperature=torch.ones(rows, device=self.device), greedy=torch.zeros(rows, dtype=torch.bool,
                                                                                 device=self.device),
            all_greedy=False, top_k=None, top_p=torch.full((rows,), 0.99, device=self.device), min_p=None,
            repetition_penalty=None, presence_penalty=None, frequency_penalty=None, output_counts=None,
            seen_mask=None, generators={}, max_logprobs=None)
        self.sampler(logits, md)
        self.sampler.distribution(logits, md)  # (the whole-row sort of drafts' verification)
        self._profile_kv_bytes = sum(c.numel() for c in caches) * elem
        del caches

    def graph_models(self) -> list[tuple[torch.nn.Module, ModelConfig]]:
        """The models that get CUDA graphs: the model, and the draft model."""
        models = [(self.model, self.model_config)]
        if self.drafter is not None:
            models.append((self.drafter.model, self.drafter.model_config))
        return models

    @torch.inference_mode()
    def profile_graph_step(self, model: torch.nn.Module, mc: ModelConfig) -> int:
        """A decode of the largest captured batch size through `model`, eagerly, on a one-block
        cache of its own: what its graphs' private memory pool holds (a capture keeps the largest
        size's activations; the smaller sizes reuse them), which the caching allocator cannot lend
        to eager steps. Returns the bytes of the cache it made."""
        n, bs = max(self.graph_sizes), self.block_size
        caches = [torch.zeros((2, 1, bs, mc.num_kv_heads, mc.head_dim), dtype=self.dtype, device=self.device)
                  for _ in range(mc.num_layers)]
        ids, pos, meta = build_batch([([1], 0, [0])] * n, bs, self.device)  # (every row on block 0)
        model(ids, pos, caches, meta)
        return sum(c.numel() * c.element_size() for c in caches)

    def profile_memory(self) -> int:
        """Device bytes this engine needs besides its KV cache, measured (CUDA): PyTorch's peak over
        the largest step (weights included, the step's own KV cache not), the CUDA graphs' memory
        pools (profile_graph_step, per model), and what the process allocated outside PyTorch since the
        runner was made."""
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        with self.on_device():
            self.profile_step()
        torch.cuda.synchronize(dev)
        # The peak is the process's: less what was allocated before this runner (another engine's).
        free0, reserved0, allocated0 = self._mem_start
        peak = torch.cuda.max_memory_allocated(dev) - allocated0 - self._profile_kv_bytes
        graphs = 0
        if self.graph_mode == "capture":  # the graphs' pools come on top: eager steps cannot use them
            for model, mc in self.graph_models():  # (a pool each: their peaks add up)
                base = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                with self.on_device():
                    made = self.profile_graph_step(model, mc)
                torch.cuda.synchronize(dev)
                graphs += max(0, torch.cuda.max_memory_allocated(dev) - base - made)
        torch.cuda.empty_cache()
        free, reserved, _ = _cuda_memory(dev)
        outside = max(0, (free0 - free) - (reserved - reserved0))
        return peak + graphs + outside

    @property
    def resident_weight_bytes(self) -> int:
        """Every tensor the weights hold on the device: parameters, prepacked copies, the draft model's."""
        models = [self.model] + ([self.drafter.model] if self.drafter is not None else [])
        return sum(t.numel() * t.element_size() for m in models for _h, _n, t in _module_tensors(m, mkldnn=True))

    def kv_cache_budget(self) -> tuple[int, str]:
        """Bytes for the KV cache, and a description of where the figure came from."""
        if self.config.kv_cache_memory_bytes is not None:
            return self.config.kv_cache_memory_bytes, "kv_cache_memory_bytes"
        if self.config.memory_bytes is not None:
            weights = self.resident_weight_bytes
            return (self.config.memory_bytes - weights,
                    f"memory_bytes={self.config.memory_bytes} less the weights' {weights} bytes")
        if self.device.type == "cuda":
            # A share of the device's total memory, so that engines in several processes can share a
            # device (vLLM's meaning): less what a profiling step measured this engine needs besides.
            util = self.config.gpu_memory_utilization
            total = torch.cuda.mem_get_info(self.device)[1]
            used = self.profile_memory()
            budget = int(total * util) - used
            free, reserved, allocated = _cuda_memory(self.device)
            free += reserved - allocated  # what PyTorch holds cached is free for the cache too
            if budget > free:
                raise ValueError(
                    f"gpu_memory_utilization={util} gives this engine {total * util / 2**30:.1f} GiB of the device's "
                    f"{total / 2**30:.1f} GiB, of which {used / 2**30:.2f} GiB are its weights and activations; the KV "
                    f"cache would need {budget / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB "
                    f"are free (other processes or engines use the rest): lower gpu_memory_utilization")
            return (budget, f"gpu_memory_utilization={util} of the device's {total / 2**30:.1f} "
                    f"GiB less {used / 2**30:.2f} GiB measured in a profiling step (weights, the largest step's "
                    f"activations and sampling, memory outside PyTorch)")
        budget = int(available_ram_bytes() * self.config.cpu_kv_cache_fraction)
        return budget, f"cpu_kv_cache_fraction={self.config.cpu_kv_cache_fraction} of available RAM"

    def allocate_kv_cache(self, num_blocks: int | None = None) -> int:
        """Allocates the KV cache: sized from the budget, or num_blocks (a parked model coming back
        gets the cache it had; on CPU the same mapping, whose pages were given back). The next
        step warms up first (warm_up)."""
        self._drop_graphs()  # they hold the old cache's addresses
        self._warm = False
        if self.kv_released and self.device.type == "cpu" and num_blocks == self.num_blocks:
            self.kv_released = False  # the pages fault back in, zeroed, as steps write them (the draft's too)
            return num_blocks
        budget, source = self.kv_cache_budget() if num_blocks is None else (0, "")
        per_block = self.kv_bytes_per_block
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        if num_blocks is not None:
            budget, source = num_blocks * per_block, "the cache it had before parking"
        num_blocks = budget // per_block  # (the graphs' spare block comes on top: one block)
        if num_blocks < blocks_per_seq:
            need = blocks_per_seq * per_block
            raise ValueError(
                f"KV cache too small: one sequence of max_model_len={self.max_model_len} tokens needs "
                f"{need / 2**20:.1f} MiB ({blocks_per_seq} blocks of {per_block} bytes), but the budget from "
                f"{source} is {max(budget, 0) / 2**20:.1f} MiB. Raise kv_cache_memory_bytes "
                f"(or gpu_memory_utilization on GPU) or lower max_model_len."
            )
        # No point holding more than every running sequence at full length could use.
        num_blocks = min(num_blocks, blocks_per_seq * self.config.max_num_seqs)
        mc = self.model_config
        shape = (2, num_blocks + self.spare_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        self.kv_caches, self._kv_arena = kv_cache_tensors(mc.num_layers, shape, self.dtype, self.device)
        if self.drafter is not None:
            self.drafter.allocate(num_blocks + self.spare_blocks, self.block_size)
        self.num_blocks = num_blocks
        self.kv_released = False
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB) from %s", num_blocks, self.block_size,
                    num_blocks * per_block / 2**20, source)
        return num_blocks

    def release_kv_cache(self) -> None:
        """Frees the KV cache (a parked model) at once. On CPU the mapping stays and only its pages
        go back to the kernel (they return zeroed as they are written), so coming back allocates
        nothing; on a GPU the tensors are freed and allocated again."""
        self._drop_graphs()
        if self.device.type == "cpu" and self._kv_arena is not None:
            release_pages(self._kv_arena)
        else:
            self.kv_caches = []
        if self.drafter is not None:
            self.drafter.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.kv_released = True

    def offload_weights(self) -> None:
        """Moves every weight tensor to host memory (pinned where CUDA is, so restoring is one DMA
        copy each). The host copies are kept: weights never change, so a later park only drops the
        device copies."""
        pin = torch.cuda.is_available()
        self._drop_graphs()  # they hold the device weights' addresses
        models = [self.model] + ([self.drafter.model] if self.drafter is not None else [])
        # Every host copy first, then the swap: a failure (no pinned memory) leaves the model whole.
        for m in models:
            host = self._host_weights.setdefault(id(m), {})
            for holder, name, t in _module_tensors(m):
                key = (id(holder), name)
                if key not in host:
                    h = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                    h.copy_(t)
                    host[key] = h
        for m in models:
            host = self._host_weights[id(m)]
            for holder, name, _t in _module_tensors(m):
                _set_tensor(holder, name, host[(id(holder), name)])
            if hasattr(m, "reset_fused"):
                m.reset_fused()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.weights_offloaded = True

    def restore_weights(self) -> None:
        """Brings offloaded weights back to the device."""
        self._drop_graphs()  # (offload_weights dropped them already; new addresses either way)
        for m in [self.model] + ([self.drafter.model] if self.drafter is not None else []):
            for holder, name, t in _module_tensors(m):
                _set_tensor(holder, name, t.to(self.device, non_blocking=True) if self.device.type != "cpu"
                            else t.clone())
            if hasattr(m, "reset_fused"):  # the C++ decoder bound the old tensors
                m.reset_fused()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.weights_offloaded = False

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copies whole KV blocks src -> dst in every layer (copy-on-write of shared blocks)."""
        idx = torch.tensor(copies, dtype=torch.long).t()
        if self.device.type == "cuda":  # (pinned, asynchronous: a step may be in flight, async scheduling)
            idx = idx.contiguous().pin_memory().to(self.device, non_blocking=True)
        src, dst = idx[0], idx[1]
        for cache in self.kv_caches + (self.drafter.kv_caches if self.drafter is not None else []):
            cache[:, dst] = cache[:, src]

    # -- one step -----------------------------------------------------------------------
    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is not None and seq.generator is None:
            seq.generator = torch.Generator(device=self.device).manual_seed((seq.params.seed + seq.index) % 2**64)
        return seq.generator

    def skip_draws(self, seq: Sequence, draws: int) -> None:
        """Advances a seeded sequence's generator past `draws` sampled tokens (one uniform draw
        each, as sample_rows takes them), for a generation resumed after that many tokens."""
        gen = self._generator(seq)
        for _ in range(draws if gen is not None else 0):
            torch.rand(1, device=self.device, generator=gen, dtype=torch.float64)

    @staticmethod
    def _wants_prompt_logprobs(s: ScheduledSeq) -> bool:
        seq = s.seq
        req = seq.request
        return (seq.index == 0 and req.prompt_logprobs is not None
                and len(req.prompt_logprobs) < seq.num_prompt_tokens and s.start < seq.num_prompt_tokens)

    def prepare(self, out: SchedulerOutput, prev: Launch | None = None) -> StepInputs:
        """Flattens the scheduled chunks into model inputs and varlen attention metadata, decodes
        (single-token chunks) first, from the persistent batch's rows (engine/input_batch.py). A
        chunk with draft tokens (speculative decoding) runs its last token and the drafts, and
        every one of its rows gets logits. A chunk whose last token is still pending (async
        scheduling: `prev`, the step in flight, sampled it) reads it from prev's tokens on the device."""
        batch = self.batch
        order = sorted(out.scheduled, key=lambda s: s.num_new_tokens != 1)
        inp = StepInputs(order=order)
        ids: list[int] = []
        rows, starts, counts = [], [], []
        fill_at: list[int] = []
        fill_from: list[int] = []
        num_decodes = 0
        row0 = 0
        sync = batch.sync
        for s in order:
            seq, start, n = s.seq, s.start, s.num_new_tokens
            row = sync(seq, start)
            rows.append(row)
            starts.append(start)
            counts.append(n)
            inp.rows.append(row0)
            tokens = seq.token_ids
            end = start + n - s.num_spec
            if n == 1:
                num_decodes += 1
            if end <= len(tokens):
                if n == 1:
                    ids.append(tokens[start])
                else:
                    ids.extend(tokens[start:end])
            else:  # its last token is pending: the step in flight sampled it
                if n > 1:
                    ids.extend(tokens[start:])
                src = prev.token_row(seq.seq_id) if prev is not None else None
                if src is None or end != len(tokens) + 1:
                    raise RuntimeError(f"{seq!r}: tokens {len(tokens)}..{end} are pending, "
                                       "but no step in flight samples them")
                fill_at.append(len(ids))
                fill_from.append(src)
                ids.append(0)
            if s.num_spec:
                ids.extend(seq.spec_token_ids[: s.num_spec])
                inp.spec_chunks.append((s, row0))
            elif s.completes:
                inp.logit_rows.append(row0 + n - 1)
                inp.sample_seqs.append(seq)
                inp.sample_batch_rows.append(row)
                for sib in s.forks:  # samples sharing this prompt draw their first token from the same row
                    inp.logit_rows.append(row0 + n - 1)
                    inp.sample_seqs.append(sib)
                    inp.sample_batch_rows.append(row)  # (the same request: the same parameters)
            # (its last condition first: no call for the decodes, most rows)
            if start < seq.num_prompt_tokens and self._wants_prompt_logprobs(s):
                inp.prompt_rows.append((s, row0, n))
            row0 += n
        head = inp.logit_rows + [r0 + j for s, r0 in inp.spec_chunks for j in range(s.num_spec + 1)]
        fill = (fill_at, fill_from, prev.tokens) if fill_at else None  # (prev.tokens: see token_row)
        inp.input_ids, inp.positions, inp.meta, inp.head_rows = batch.build(ids, rows, starts, counts, num_decodes,
                                                                            head, fill)
        return inp

    def warm_up(self) -> None:
        """Before the first step after the KV cache is allocated (start-up, a parked model coming
        back), on the thread that runs the steps (a pool loads models on another thread, and a
        capture must not overlap the device thread's frees): the CUDA graphs are made (captured on
        a GPU, which compiles the kernels at their sizes), and on a GPU the triton decode kernel is
        compiled for every split count an eager step may use, all at once rather than one variant
        at a time in later steps, and so is the sampler's kernel for wide nuclei."""
        self._warm = True
        if self.kv_released or not self.kv_caches:
            return
        with self.on_device():
            self._ensure_graphs()
            if (self.device.type == "cuda" and self.attn_backend.name == "triton"
                    and os.environ.get("TRITON_INTERPRET") != "1"):
                try:
                    self.compile_decode_variants()
                except Exception:  # (out of memory, say): the variants then compile when first used
                    logger.exception("compiling the decode kernel's variants failed; continuing without")
            if self.device.type == "cuda" and not self.embed:
                self._compile_sampler_kernel()

    def _compile_sampler_kernel(self) -> None:
        """The sampler's kernel for wide nuclei, compiled now rather than by the first top-p step;
        should it fail, the sampler finds and sorts those rows instead (a wait for the device)."""
        import tokenmill.sample.sampler as sampler_mod

        if sampler_mod.WIDE_KERNEL is False or not sampler_mod.has_triton():
            return
        try:
            from tokenmill.sample.triton_sample import example_launch

            example_launch(self.model_config.vocab_size, device=self.device).launch()
        except Exception:
            logger.exception("compiling the sampler's kernel failed; wide nuclei will be sorted instead")
            sampler_mod.WIDE_KERNEL = False

    def _ensure_graphs(self) -> None:
        """The decode graphs of the model and of the draft model (whose single-row passes, k - 1 a
        step, are decode-only batches too), on the same spare block, sizes and mode."""
        if self.graph_mode == "off" or self._graphs is not None:
            return
        def make(model: torch.nn.Module, caches: list[torch.Tensor]) -> DecodeGraphs:
            return DecodeGraphs(model, caches, self.num_blocks, self.block_size, self.max_model_len,
                                self.graph_sizes, self.device, capture=self.graph_mode == "capture")

        try:
            if self.drafter is not None:
                self.drafter.graphs = make(self.drafter.model, self.drafter.kv_caches)
            self._graphs = make(self.model, self.kv_caches)
        except Exception:  # out of memory, a capture error: serve eagerly rather than not at all
            logger.exception("CUDA graphs could not be made; every step runs eagerly from now on")
            self.graph_mode = "off"
            self._drop_graphs()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _drop_graphs(self) -> None:
        self._graphs = None
        if self.drafter is not None:
            self.drafter.graphs = None

    def compile_decode_variants(self) -> list[int]:
        """Compiles paged_decode for every split count an eager step may use, and the prefill
        kernel, for the model and then for the draft model (its own head counts and head size are
        other variants), so that no serving step waits for Triton's compiler. Returns the model's
        split counts."""
        splits = _compile_decode_variants(self.model, self.kv_caches, self.attn_backend, self.dtype,
                                          self.block_size, self.num_blocks, self.max_model_len, self.device)
        if self.drafter is not None and self.drafter.kv_caches:
            d = self.drafter
            _compile_decode_variants(d.model, d.kv_caches, d.backend, self.dtype, self.block_size,
                                     self.num_blocks, self.max_model_len, self.device)
        return splits

    @torch.inference_mode()
    def forward(self, inp: StepInputs) -> torch.Tensor:
        """Final hidden states for every scheduled token: a decode-only step through a CUDA graph
        where there is one for its size, any other eagerly."""
        meta = inp.meta
        if self.graph_mode != "off":
            self._ensure_graphs()  # (made by warm_up; again here after the weights moved)
            if self._graphs is not None:
                hidden = self._graphs.forward(inp.input_ids, inp.positions, meta)
                if hidden is not None:
                    return hidden
        return self.model(inp.input_ids, inp.positions, self.kv_caches, meta)

    @property
    def graph_replays(self) -> int:
        """Decode steps run by a CUDA graph (padded: by the graphs' static buffers) since the graphs were made."""
        return self._graphs.num_replays if self._graphs is not None else 0

    def on_device(self) -> contextlib.AbstractContextManager:
        """The model's GPU as the current device while it runs (Triton launches and CUDA graphs
        capture on the current device, which may be another: a model on cuda:1); once a step."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def execute(self, out: SchedulerOutput) -> StepResult:
        """One step, start to finish: launch, sample, collect."""
        return self.collect(self.sample(self.launch(out)))

    def launch(self, out: SchedulerOutput, prev: Launch | None = None, timed: bool = False) -> Launch:
        """Queues a step's forward and LM head on the device; the host does not wait for them.
        prev: the step still in flight whose sampled tokens this one's pending inputs are (async
        scheduling). timed: on a GPU, CUDA events time the step on the device (Launch.device_seconds)."""
        if not self._warm:
            self.warm_up()
        with self.on_device(), torch.inference_mode():
            t0 = time.perf_counter()
            launch = Launch(out)
            if timed and self.device.type == "cuda":
                launch.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                launch.events[0].record()
            if self.drafter is not None:  # every step, so that its KV keeps level with the target's
                self.drafter.propose(out.scheduled, self.block_size)
            launch.inp = inp = self.prepare(out, prev)
            launch.hidden = hidden = self.forward(inp)
            if not self.embed and (inp.logit_rows or inp.spec_chunks):
                launch.logits = self.model.compute_logits(hidden[inp.head_rows])
            launch.host_seconds = time.perf_counter() - t0
        return launch

    def sample(self, launch: Launch) -> Launch:
        """Queues the sampling of a launched step, and the copy of its tokens to the host. Steps that
        ask for logprobs, prompt logprobs, embeddings or verify drafts read them back here."""
        with self.on_device(), torch.inference_mode():
            t0 = time.perf_counter()
            inp, hidden, result = launch.inp, launch.hidden, launch.result
            if self.embed and inp.logit_rows:
                # Last-token pooling: the final (normed) hidden state of the prompt's last token, as an
                # embedding or through a classifier's head.
                pooled = self.model.pool(hidden[inp.head_rows]).tolist()
                for seq, vec in zip(inp.sample_seqs, pooled):
                    result.embeddings[seq.seq_id] = vec
            elif launch.logits is not None:
                n = len(inp.logit_rows)
                if n:
                    self._sample(launch.logits[:n], inp, launch)
                if inp.spec_chunks:
                    self._verify(launch.logits[n:], inp.spec_chunks, result)
            for s, row0, n in inp.prompt_rows:
                result.prompt_logprobs[s.seq.seq_id] = self._prompt_logprobs(s, hidden[row0 : row0 + n])
            launch.hidden = launch.logits = None
            if launch.deferred and self.device.type == "cuda":
                try:
                    host = torch.empty(launch.tokens.shape, dtype=launch.tokens.dtype, pin_memory=True)
                except RuntimeError:  # no page-locked memory: collect() copies them synchronously
                    host = None
                if host is not None:
                    launch.host_tokens = host.copy_(launch.tokens, non_blocking=True)
            if launch.events is not None:  # (before `done`: collect's wait covers it, elapsed_time needs it)
                launch.events[1].record()
            if self.device.type == "cuda":
                launch.done = torch.cuda.Event()
                launch.done.record()
            launch.host_seconds += time.perf_counter() - t0
        return launch

    def collect(self, launch: Launch) -> StepResult:
        """A sampled step's result, once the device has finished it (the host waits here)."""
        if launch.done is not None:
            launch.done.synchronize()
        if launch.deferred:
            host = launch.host_tokens if launch.host_tokens is not None else launch.tokens
            sampled = launch.result.sampled
            for seq, token in zip(launch.token_seqs, host.tolist()):
                sampled[seq.seq_id] = [(token, None)]
            launch.deferred = False
        return launch.result

    def _sample(self, logits: torch.Tensor, inp: StepInputs, launch: Launch) -> None:
        """Samples a token for every logits row from the persistent batch's parameter columns; only
        rows marked special (a seed, bans, biases, penalties, a grammar, beams) are visited one by one."""
        seqs = inp.sample_seqs
        result = launch.result
        cols = self.batch.columns.take(np.array(inp.sample_batch_rows, np.int64))
        special = cols.rows_with(USES_SPECIAL)
        beams = [i for i in special if seqs[i].request.beam is not None]
        if beams:
            # Beam search scores raw float32 log-probabilities, as transformers does.
            k = min(max(seqs[i].request.beam.num_candidates for i in beams), logits.shape[-1])
            vals, ids = torch.log_softmax(logits[beams].float(), dim=-1).topk(k, dim=-1)
            for i, row_ids, row_vals in zip(beams, ids.tolist(), vals.tolist()):
                result.beams[seqs[i].seq_id] = (row_ids, row_vals)
            if len(beams) == len(seqs):
                return
            rest = sorted(set(range(len(seqs))) - set(beams))
            logits, seqs, cols = logits[rest], [seqs[i] for i in rest], cols.take(np.array(rest, np.int64))
            special = cols.rows_with(USES_SPECIAL)
        for i in special:
            self._generator(seqs[i])
        # (a sequence that ended while this step was in flight has a row whose token is dropped)
        constrained = [i for i in special if (seqs[i].matcher is not None or seqs[i].params.allowed_token_ids)
                       and not seqs[i].is_finished]
        bitmask = self._masks([(seqs[i], []) for i in constrained]) if constrained else None
        md = SamplingMetadata.from_columns(cols, seqs, self.model_config.vocab_size, self.device,
                                           stage=self.batch.sample_staging, bitmask=bitmask, mask_rows=constrained)
        launch.token_seqs = seqs
        if md.max_logprobs is None:  # read back in collect(), without waiting here
            launch.tokens = self.sampler.tokens(logits, md)
            launch.deferred = True
            return
        so = self.sampler(logits, md)
        launch.tokens = so.tokens
        for i, seq in enumerate(seqs):
            entry = None
            k = seq.params.logprobs
            if k is not None:
                entry = _entry(so.token_ids[i], so.sampled_logprobs[i], so.sampled_ranks[i],
                               so.topk_ids[i][:k], so.topk_logprobs[i][:k])
            result.sampled[seq.seq_id] = [(so.token_ids[i], entry)]

    def _masks(self, rows: list[tuple[Sequence, list[int]]]) -> torch.Tensor:
        """The allowed-token bitmask of these sequences' rows (one, and one more per draft): a
        grammar's state (fill_bitmask) and allowed_token_ids, both where a sequence has both (the
        grammar's alone should they leave nothing)."""
        vocab = self.model_config.vocab_size
        grammar = [(s.matcher, d) for s, d in rows if s.matcher is not None]
        if len(grammar) == len(rows) and not any(s.params.allowed_token_ids for s, _ in rows):
            return fill_bitmask(grammar, vocab)
        bitmask = torch.full((sum(1 + len(d) for _, d in rows), (vocab + 31) // 32), -1, dtype=torch.int32)
        if grammar:
            at, r = [], 0
            for s, d in rows:
                if s.matcher is not None:
                    at.extend(range(r, r + 1 + len(d)))
                r += 1 + len(d)
            bitmask[at] = fill_bitmask(grammar, vocab)
        r = 0
        for s, d in rows:
            n = 1 + len(d)
            if s.params.allowed_token_ids:
                req = s.request
                if req.allowed_mask is None:
                    req.allowed_mask = ids_bitmask(s.params.allowed_token_ids, vocab)
                both = bitmask[r : r + n] & req.allowed_mask
                empty = ~both.any(dim=1)
                both[empty] = bitmask[r : r + n][empty]
                bitmask[r : r + n] = both
            r += n
        return bitmask

    def _verify(self, logits: torch.Tensor, chunks: list[tuple[ScheduledSeq, int]], result: StepResult) -> None:
        """Rejection sampling of each chunk's drafts against its k + 1 rows of target logits."""
        row_seqs = [s.seq for s, _ in chunks for _ in range(s.num_spec + 1)]
        mask_chunks, mask_rows, r = [], [], 0
        for s, _ in chunks:
            if s.seq.matcher is not None or s.seq.params.allowed_token_ids:
                # each draft position masked by the grammar's state after the drafts before it
                mask_chunks.append((s.seq, s.seq.spec_token_ids[: s.num_spec]))
                mask_rows.extend(range(r, r + s.num_spec + 1))
            r += s.num_spec + 1
        bitmask = self._masks(mask_chunks) if mask_chunks else None
        md = SamplingMetadata.from_sequences(row_seqs, self.model_config.vocab_size, self.device, bitmask, mask_rows)
        argmax, probs = self.sampler.distribution(logits, md)
        want_logprobs = any(s.seq.params.logprobs is not None for s, _ in chunks)
        raw = torch.log_softmax(logits.float(), dim=-1) if want_logprobs else None
        starts, drafts, greedy = [], [], []
        r = 0
        for s, _ in chunks:
            starts.append(r)
            drafts.append(s.seq.spec_token_ids[: s.num_spec])
            greedy.append(s.seq.params.greedy)
            r += s.num_spec + 1
        for (s, _), r, (tokens, accepted) in zip(chunks, starts, verify(argmax, probs, starts, drafts, greedy)):
            seq, k = s.seq, s.num_spec
            lp = seq.params.logprobs
            entries = _logprob_entries(raw[r : r + k + 1], tokens, lp) if lp is not None else [None] * len(tokens)
            result.sampled[seq.seq_id] = list(zip(tokens, entries))
            result.spec[seq.seq_id] = (k, accepted)

    def _prompt_logprobs(self, s: ScheduledSeq, hidden: torch.Tensor) -> list[PositionLogprobs]:
        """Logprobs of prompt tokens start+1 .. start+n given their prefixes."""
        seq = s.seq
        end = min(s.start + s.num_new_tokens, seq.num_prompt_tokens - 1)  # last position predicting a prompt token
        count = end - s.start
        if count <= 0:
            return []
        targets = seq.token_ids[s.start + 1 : s.start + 1 + count]
        # A few hundred rows at a time: a whole chunk's logits in float32 (8192 rows of a 152K
        # vocabulary: 5 GB, twice over with log_softmax) is memory the profiling step never saw.
        entries: list[PositionLogprobs] = []
        for a in range(0, count, PROMPT_LOGPROB_ROWS):
            rows = hidden[a : min(count, a + PROMPT_LOGPROB_ROWS)]
            logprobs = torch.log_softmax(self.model.compute_logits(rows).float(), dim=-1)
            entries += _logprob_entries(logprobs, targets[a : a + len(rows)], seq.params.prompt_logprobs)
        return entries


PROMPT_LOGPROB_ROWS = 256


def _logprob_entries(logprobs: torch.Tensor, tokens: list[int], k: int) -> list[PositionLogprobs]:
    """One entry per token: its logprob and rank in its row of logprobs, and the row's top k."""
    rows = logprobs[: len(tokens)]
    chosen, ranks = token_logprobs(rows, torch.tensor(tokens, device=rows.device))
    ids, vals = topk_logprobs(rows, k)
    return [_entry(t, c, r, i, v) for t, c, r, i, v in zip(tokens, chosen, ranks, ids, vals)]


def _entry(token: int, logprob: float, rank: int, top_ids: list[int], top_vals: list[float]) -> PositionLogprobs:
    entry = {tid: Logprob(lp, r + 1) for r, (tid, lp) in enumerate(zip(top_ids, top_vals))}
    entry[token] = Logprob(logprob, rank)
    return entry
