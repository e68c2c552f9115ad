"""Command-line flags for engine settings, shared by `tokenmill serve`, `generate`, `chat`, ..."""

from __future__ import annotations

import argparse
import json
import math

from tokenmill.config import EngineConfig


def add_engine_arguments(p: argparse.ArgumentParser, many_models: bool = False) -> None:
    d = EngineConfig(model="")
    if many_models:
        p.add_argument("--model", action="append", default=None,
                       help="Hugging Face model folder (default: the demo model in the package); repeat it to "
                            "serve several models, each under its folder's name")
    else:
        p.add_argument("--model", default=None,
                       help="Hugging Face model folder (default: the demo model in the package)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                   help="the chat template in place of the tokenizer's: a Jinja file, or the template text itself")
    p.add_argument("--generation-config", default=d.generation_config, metavar="auto|vllm|DIR",
                   help="default sampling settings for requests that leave them out: 'auto' takes temperature, "
                   "top_p, top_k, min_p, repetition_penalty and max_new_tokens from the model's "
                   "generation_config.json (vLLM's default), 'vllm' the API's own, or a folder's file")
    p.add_argument("--dtype", default=d.dtype, help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences per batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="token budget of one step (prefill chunk size)")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV cache block")
    p.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                   help="KV cache size in GiB (default: a share of free memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quantization", default=None, choices=["int8"],
                   help="quantize the weights at load: int8 (per-output-channel scales)")
    p.add_argument("--prepack-weights", action=argparse.BooleanOptionalAction, default=d.prepack_weights,
                   help="on CPU, keep a copy of the float32/bfloat16 weights in oneDNN's layout for batched steps "
                        "(faster, the weights' memory again; default: when it fits in a quarter of free RAM)")
    p.add_argument("--task", default=d.task, choices=["auto", "generate", "embed", "classify"],
                   help="embed: serve /v1/embeddings, /score and /rerank (last-token pooling, normalized); classify: "
                        "/classify, /score and /rerank (a classification head on the last token); auto: classify for "
                        "a *ForSequenceClassification checkpoint, embed for a bare decoder or sentence-transformers "
                        "folder")
    p.add_argument("--classifier-from-token", default=None, type=_token_list, metavar="NO,YES",
                   help="run a causal LM as a classifier of these tokens' logits (vLLM's classifier_from_token): two "
                        "tokens make a reranker whose score is the second's probability against the first (Qwen3-"
                        "Reranker: no,yes)")
    p.add_argument("--allow-long-max-model-len", action="store_true",
                   help="accept --max-model-len beyond the model's max_position_embeddings (and RoPE scaling)")
    p.add_argument("--attention-backend", default=d.attention_backend,
                   help="auto (cpu kernels on CPU; on CUDA triton where installed, else torch), cpu, torch or "
                        "triton (one Triton kernel per step; needs the triton package)")
    p.add_argument("--load-format", default=d.load_format, choices=["auto", "dummy"],
                   help="auto: the folder's safetensors; dummy: random weights from config.json alone (benchmarks)")
    p.add_argument("--cuda-graphs", default=d.cuda_graphs, choices=["auto", "on", "off", "padded"],
                   help="CUDA graphs for decode-only steps: auto (on CUDA with the triton backend), on, off (as "
                        "vLLM's --enforce-eager), padded (their static buffers without capture, any device)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (--cuda-graphs off)")
    p.add_argument("--async-scheduling", default=d.async_scheduling, choices=["auto", "on", "off"],
                   help="schedule and queue each step while the one before still runs on the device: auto (on "
                        "CUDA), on, off (not with speculative decoding or an embedding model)")
    p.add_argument("--cuda-graph-sizes", default=None, metavar="N,N,...",
                   help="decode batch sizes to capture (default: 1,2,4 and multiples of 8 up to --max-num-seqs)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s shape: \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                        'or \'{"method": "draft_model", "model": DIR, "num_speculative_tokens": 4}\'')
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=d.enable_prefix_caching,
                   help="reuse the KV cache of shared prompt prefixes across requests")
    p.add_argument("--scheduling-policy", default=d.scheduling_policy, choices=["fcfs", "priority", "slo"],
                   help="fcfs (arrival), priority (the request's priority, then arrival) or slo (latency targets: "
                        "requests with ttft/tpot targets first, ordered by slack, steps sized to keep TPOT targets)")
    p.add_argument("--slo-admission", default=d.slo_admission, choices=["reject", "demote", "off"],
                   help="slo policy: a request whose TTFT target cannot be met is refused (429 with the reason), "
                        "demoted to best effort, or queued anyway (off)")
    en = p.add_argument_group("energy and cost", "per-request energy, device time and cost (usage.compute)")
    en.add_argument("--energy-source", default=d.energy_source, choices=["auto", "rapl", "nvml", "model"],
                    help="where step energy is read: rapl (Linux powercap), nvml (the GPU's counter, needs pynvml), "
                         "model (a power model: idle + busy watts per thread); auto: nvml on CUDA, rapl on the CPU, "
                         "else the model")
    en.add_argument("--power-watts", type=float, default=None, metavar="W",
                    help="the power model's draw per busy CPU thread (default 5) or per GPU (default 250)")
    en.add_argument("--power-idle-watts", type=float, default=None, metavar="W",
                    help="the power model's idle draw (default 1.5 per CPU thread used, 50 for a GPU)")
    en.add_argument("--price-per-device-hour", type=float, default=d.price_per_device_hour, metavar="USD",
                    help="$ per hour of device time (the machine's or GPU's rental), for usage.compute.cost_usd")
    en.add_argument("--price-per-kwh", type=float, default=d.price_per_kwh, metavar="USD", help="$ per kWh")
    en.add_argument("--pue", type=float, default=d.pue,
                    help="power usage effectiveness: facility energy per joule the device draws (default 1.0: "
                         "the device alone; data centres run about 1.1 to 1.6)")


def engine_config_from_args(args: argparse.Namespace, model: str | None = None) -> EngineConfig:
    from tokenmill.llm import default_model_path

    if args.kv_cache_memory is not None and not (math.isfinite(args.kv_cache_memory) and args.kv_cache_memory > 0):
        raise ValueError(f"--kv-cache-memory: must be a positive number of GiB, got {args.kv_cache_memory!r}")
    kv = None if args.kv_cache_memory is None else int(args.kv_cache_memory * 2**30)
    return EngineConfig(
        model=model or (args.model if isinstance(args.model, str) else None) or default_model_path(),
        tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
        chat_template=getattr(args, "chat_template", None),
        generation_config=getattr(args, "generation_config", "auto"),
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size, kv_cache_memory_bytes=kv,
        gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
        enable_prefix_caching=args.enable_prefix_caching, quantization=args.quantization,
        prepack_weights=args.prepack_weights, allow_long_max_model_len=args.allow_long_max_model_len, task=args.task,
        classifier_from_token=getattr(args, "classifier_from_token", None),
        attention_backend=args.attention_backend, speculative_config=args.speculative_config,
        load_format=getattr(args, "load_format", "auto"),
        cuda_graphs="off" if getattr(args, "enforce_eager", False) else getattr(args, "cuda_graphs", "auto"),
        cuda_graph_sizes=_sizes(getattr(args, "cuda_graph_sizes", None)),
        async_scheduling=getattr(args, "async_scheduling", "auto"),
        load_progress=getattr(args, "progress", True),
        scheduling_policy=getattr(args, "scheduling_policy", "priority"),
        slo_admission=getattr(args, "slo_admission", "demote"),
        energy_source=args.energy_source, power_watts=args.power_watts, power_idle_watts=args.power_idle_watts,
        price_per_device_hour=args.price_per_device_hour, price_per_kwh=args.price_per_kwh, pue=args.pue,
    )


def _sizes(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--cuda-graph-sizes: expected comma-separated integers, got {spec!r}") from None


def _token_list(spec: str) -> list[str]:
    """--classifier-from-token: tokens separated by commas, or a JSON list (for tokens with commas)."""
    if spec.lstrip().startswith("["):
        try:
            tokens = json.loads(spec)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}") from None
        if not isinstance(tokens, list):
            raise argparse.ArgumentTypeError("expected a JSON list of token strings")
        return tokens
    return [t.strip() for t in spec.split(",") if t.strip()]  # ("no, yes": the spaces are not the tokens')
