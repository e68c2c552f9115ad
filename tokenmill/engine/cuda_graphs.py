"""CUDA graphs of the model's forward for decode-only steps (issue 16).

A decode step of a small model on a GPU is mostly kernel launches: a few hundred per step,
each costing the CPU microseconds while the GPU waits. A CUDA graph records the launches of one
forward once and replays them with one call. A graph replays fixed shapes at fixed addresses,
so:
- graphs are captured for a set of batch sizes (`default_sizes`); a step of b decodes runs the
  smallest captured size >= b, the rows past b padded; steps with a prefill chunk, drafts, or
  more decodes than the largest size run eagerly;
- the inputs live in static buffers the graphs were captured on, and each step copies its own
  inputs into them: token ids, positions, cache slots, context lengths and block tables;
- padded rows write their key and value into a spare KV block that the block manager never
  hands out (the runner allocates it) and attend to it alone, so they touch no sequence's cache.

Only the `triton` attention backend can be captured: its one kernel per layer reads context
lengths from device memory, where the `torch` backend sizes its gathers from host-side lengths.
With `padded` (EngineConfig.cuda_graphs) the same static buffers and padding run without capture,
on any device: that is how CI tests this logic on a CPU (Triton under its interpreter); a GPU
then adds only the capture.

A draft model (speculative decoding) has graphs of its own for its single-row passes, made and
dropped with the model's (DraftModel.graphs), on the same spare block of its own cache.

Graphs hold the addresses of the weights and the KV cache: parking a model (which frees both)
drops them. They are captured before the first step after the KV cache is allocated
(ModelRunner.warm_up): at start-up, and again when a parked model comes back.
"""

from __future__ import annotations

import logging
import time

import torch

from tokenmill.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def default_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_num_seqs (at most 512), and max_num_seqs itself
    when it is not one of them: vLLM's choice, a row of padding per 8 at worst."""
    top = min(max_num_seqs, 512)
    sizes = [s for s in (1, 2, 4) if s <= top] + list(range(8, top + 1, 8))
    if top not in sizes:
        sizes.append(top)
    return sorted(sizes)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], spare_block: int, block_size: int,
                 max_model_len: int, sizes: list[int], device: torch.device, capture: bool) -> None:
        if not sizes:
            raise ValueError("cuda graphs: no batch sizes to capture")
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.sizes = sorted(set(sizes))
        self.capture = capture
        self.device = device
        n = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.spare_slot = spare_block * block_size
        self.spare_block = spare_block
        # The static buffers every graph reads (views of their first `size` rows).
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), self.spare_slot, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.long, device=device)  # one query row each, always
        self.seq_lens = torch.ones(n, dtype=torch.long, device=device)
        self.block_tables = torch.full((n, self.max_blocks), spare_block, dtype=torch.long, device=device)
        self._meta = {b: self._metadata(b) for b in self.sizes}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0  # steps served by a graph (or, padded, by the static buffers)
        if capture:
            self._capture_all()

    def _metadata(self, b: int) -> AttentionMetadata:
        """The metadata of a padded batch of b decodes over the static buffers: its host-side figures
        are fixed (the longest possible context), its tensors are what each step writes."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b], num_decodes=b, max_query_len=1,
            max_seq_len=self.max_model_len, block_size=self.block_size, query_start_loc_cpu=list(range(b + 1)),
            seq_lens_cpu=[self.max_model_len] * b)

    def size_for(self, batch: int) -> int | None:
        """The smallest captured size that holds `batch` decodes, or None (run eagerly)."""
        for s in self.sizes:
            if s >= batch:
                return s
        return None

    def _forward(self, b: int) -> torch.Tensor:
        meta = self._meta[b]
        meta.scratch.clear()
        return self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, meta)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        t0 = time.perf_counter()
        pool = None
        # On the model's device (Triton and the capture stream follow the current device), in
        # thread_local mode: a model pool may be loading another model on another thread meanwhile.
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            # Largest first, all in one memory pool: a smaller graph reuses the larger one's memory.
            for b in reversed(self.sizes):
                self._forward(b)  # warm-up outside the capture: kernels compile, workspaces are allocated
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    self._outputs[b] = self._forward(b)
                pool = graph.pool()
                self._graphs[b] = graph
            torch.cuda.synchronize(self.device)
        logger.info("CUDA graphs: captured %d decode batch sizes (%d..%d) in %.2f s", len(self.sizes),
                    self.sizes[0], self.sizes[-1], time.perf_counter() - t0)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """Final hidden states of a decode-only step through the graph of its padded size, or None
        when the step is not one a graph holds."""
        b = meta.num_seqs
        if meta.max_query_len != 1 or meta.num_decodes != b or b == 0:
            return None
        size = self.size_for(b)
        if size is None:
            return None
        width = meta.block_tables.shape[1]
        if width > self.max_blocks:
            return None
        self.input_ids[:b].copy_(input_ids, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        self.slot_mapping[:b].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:b].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:b, :width].copy_(meta.block_tables, non_blocking=True)
        if size > b:  # rows left by a larger step must not write into, or read, a sequence's blocks
            self.slot_mapping[b:size].fill_(self.spare_slot)
            self.seq_lens[b:size].fill_(1)
            self.block_tables[b:size, 0].fill_(self.spare_block)
        self.num_replays += 1
        if not self.capture:
            return self._forward(size)[:b]
        self._graphs[size].replay()
        return self._outputs[size][:b]
