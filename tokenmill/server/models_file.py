"""The model pool's configuration: repeated --model flags, or a models.yaml file.

```yaml
memory_budget: 4          # GiB for the active models' weights and KV caches (--memory-budget)
host_memory_budget: 16    # GiB of parked weights kept in host memory (--host-memory-budget)
swap_quantum: 2           # seconds before a busy model is parked for a waiting one (--swap-quantum)
load_timeout: 120         # seconds a request waits for its model (--model-load-timeout)
models:
  - name: small           # the id clients send (default: the folder's name)
    path: ./demo-small
    pinned: true          # never parked to make room
    memory_share: 0.25    # weights + KV cache as a share of memory_budget (or kv_cache_memory: GiB)
    dtype: float32        # any engine setting: dtype, quantization, max_model_len, max_num_seqs, ...
    price_per_device_hour: 0.5   # this model's prices (usage.compute.cost_usd), else the command line's
  - path: ./demo
    speculative_config: {model: ./demo-small, num_speculative_tokens: 4}   # (false: none, whatever the flags say)
tiers:
  - name: tokenmill/auto
    route: {policy: cascade, small: small, strong: demo, threshold: -2.5, metric: surprise}
```

A model entry takes the engine settings by their flag names with underscores; what it leaves out
comes from the command line; relative folders (path, tokenizer, a draft model) are the file's.
Every mistake is a ValueError naming its field (models[1].dtype), raised at startup: a model
that starts on disk has everything its engine checks before loading weights (config.json,
context, tokenizer folder, task, attention backend, generation_config.json, ...) and its draft
model checked then too, and a cascade tier's models must generate text.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from tokenmill.config import EngineConfig, SpeculativeConfig, load_yaml_file
from tokenmill.engine.llm_engine import check_config
from tokenmill.engine.spec_decode import check_draft_model
from tokenmill.routing import CascadePolicy, policy_from_dict
from tokenmill.server.gateway import Tier
from tokenmill.server.pool import ModelSpec, PoolConfig

GIB = 2**30
# Engine settings a models.yaml entry may set (EngineConfig fields, flag names with underscores).
ENGINE_KEYS = {"dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size", "seed",
               "enable_prefix_caching", "attention_backend", "quantization", "prepack_weights", "task",
               "allow_long_max_model_len", "speculative_config", "tokenizer", "gpu_memory_utilization",
               "scheduling_policy", "slo_admission", "price_per_device_hour", "price_per_kwh", "pue",
               "cuda_graphs", "cuda_graph_sizes", "generation_config", "classifier_from_token",
               "chat_template"}
MODEL_KEYS = ENGINE_KEYS | {"name", "path", "pinned", "memory_share", "kv_cache_memory", "tool_call_parser",
                            "reasoning_parser"}
TOP_KEYS = {"models", "tiers", "memory_budget", "host_memory_budget", "swap_quantum", "load_timeout"}
# The types of the engine settings (a YAML "no" is a string, not False).
_TYPES: dict[str, tuple[type, ...]] = {
    "dtype": (str,), "max_model_len": (int,), "max_num_seqs": (int,), "max_num_batched_tokens": (int,),
    "block_size": (int,), "seed": (int,), "enable_prefix_caching": (bool,), "attention_backend": (str,),
    "quantization": (str, bool), "prepack_weights": (bool,), "task": (str,), "allow_long_max_model_len": (bool,),
    "speculative_config": (dict, str, bool), "tokenizer": (str,), "gpu_memory_utilization": (int, float),
    "tool_call_parser": (str,), "reasoning_parser": (str,), "name": (str,), "scheduling_policy": (str,),
    "slo_admission": (str,), "price_per_device_hour": (int, float), "price_per_kwh": (int, float),
    "pue": (int, float), "cuda_graphs": (str,), "cuda_graph_sizes": (list,), "classifier_from_token": (list,),
    "chat_template": (str,), "generation_config": (str,)}


@dataclasses.dataclass
class ModelEntry:
    """One model as configured, before the pool's memory is shared out."""

    name: str
    config: EngineConfig
    pinned: bool = False
    memory_share: float | None = None
    tool_call_parser: str = "auto"
    reasoning_parser: str | None = None
    task: str = "generate"  # as check_model resolved it (a cascade tier's models must generate)


def served_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def _number(v: Any, field: str, positive: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{field}: must be a positive number, got {v!r}")
    return float(v)


def check_model(config: EngineConfig, probe_device: bool = True) -> str:
    """A model's settings and folder checked at startup, not at its first request: one that starts
    on disk would otherwise fail that request after the active model was pushed out for it. What
    LLMEngine checks before it loads weights (its config.json, context, tokenizer folder, task,
    attention backend, generation_config.json, ...) and its draft model; ValueError naming the
    fault. probe_device False: the checks that depend on the device are left to the engine (a
    Ray driver's devices are not the nodes'). Returns the model's task (generate, embed, classify)."""
    device = config.resolve_device() if probe_device else None
    # (the tokenizer itself is loaded only when classifier_from_token must be found in it: a large
    # one takes a while, and the engine loads it again)
    setup = check_config(config, device, load_tokenizer_now=False)
    mc = setup.model_config
    spec = config.speculative_config
    if spec is not None and spec.model:
        try:
            check_draft_model(spec.model, mc.vocab_size, setup.max_model_len, config.allow_long_max_model_len,
                              config.tokenizer or config.model)
        except ValueError as e:
            why = str(e).removeprefix("speculative_config: ").removeprefix("model: ")
            raise ValueError(f"speculative_config.model: {why}") from None
    return setup.task


def read_models_file(path: str, base: EngineConfig, tool_call_parser: str = "auto",
                     reasoning_parser: str | None = None, probe_device: bool = True,
                     ) -> tuple[list[ModelEntry], list[dict[str, Any]], dict[str, float]]:
    """(models, raw tier entries, pool settings in the file) from a models.yaml (probe_device:
    check_model's)."""
    doc = load_yaml_file(path, "--models")
    if not isinstance(doc, dict):
        raise ValueError(f"--models: {path} must hold a mapping with a `models` list")
    extra = sorted(set(doc) - TOP_KEYS)
    if extra:
        raise ValueError(f"{extra[0]}: unknown setting in {path} (known: {', '.join(sorted(TOP_KEYS))})")
    raw = doc.get("models")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"models: {path} must list at least one model")
    here = os.path.dirname(os.path.abspath(path))
    models = []
    for i, m in enumerate(raw):
        f = f"models[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{f}: must be a mapping with at least `path`")
        extra = sorted(set(m) - MODEL_KEYS)
        if extra:
            raise ValueError(f"{f}.{extra[0]}: unknown setting (known: {', '.join(sorted(MODEL_KEYS))})")
        for k, types in _TYPES.items():
            v = m.get(k)
            if v is not None and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
                raise ValueError(f"{f}.{k}: must be {' or '.join(t.__name__ for t in types)}, got {v!r}")
        p = m.get("path")
        if not isinstance(p, str) or not p:
            raise ValueError(f"{f}.path: the model's folder is required")
        p = p if os.path.isabs(p) else os.path.normpath(os.path.join(here, p))
        if not os.path.isdir(p):
            raise ValueError(f"{f}.path: {p} is not a folder")
        name = m.get("name", served_name(p))
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{f}.name: must be a non-empty string")
        changes: dict[str, Any] = {k: m[k] for k in ENGINE_KEYS & set(m) if m[k] is not None}  # null: the default
        changes["model"] = p

        def near(q: Any) -> Any:  # a relative folder is the file's, as `path` is
            return os.path.normpath(os.path.join(here, q)) if isinstance(q, str) and q and not os.path.isabs(q) else q

        if "tokenizer" in changes:
            changes["tokenizer"] = near(changes["tokenizer"])
        template = changes.get("chat_template")
        if isinstance(template, str) and "{" not in template:  # (a file, not the template's text)
            changes["chat_template"] = near(template)
        if changes.get("generation_config") not in (None, "auto", "vllm"):
            changes["generation_config"] = near(changes["generation_config"])
        q = m.get("quantization")
        if q is False:  # this model's weights stay as they are, whatever the flags say
            changes["quantization"] = None
        elif q is True:
            raise ValueError(f"{f}.quantization: a method (int8), or false for none")
        spec = m.get("speculative_config")
        if spec is False:  # this model does not speculate, whatever the flags say
            changes["speculative_config"] = None
        elif spec is True:
            raise ValueError(f"{f}.speculative_config: an object (method, model, ...), or false for none")
        elif spec is not None:  # (a JSON string or an object; its draft folder is the file's too)
            try:
                parsed = SpeculativeConfig.parse(spec)
            except ValueError as e:
                raise ValueError(f"{f}: {e}") from None
            if parsed is not None and parsed.model:
                parsed.model = near(parsed.model)
            changes["speculative_config"] = parsed
        if "kv_cache_memory" in m:
            changes["kv_cache_memory_bytes"] = int(_number(m["kv_cache_memory"], f"{f}.kv_cache_memory") * GIB)
        try:
            config = dataclasses.replace(base, **changes)
            task = check_model(config, probe_device)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{f}: {e}") from None
        pinned = m.get("pinned", False)
        if not isinstance(pinned, bool):
            raise ValueError(f"{f}.pinned: true or false, got {pinned!r}")
        share = m.get("memory_share")
        if share is not None:
            share = _number(share, f"{f}.memory_share")
            if share > 1:
                raise ValueError(f"{f}.memory_share: a share of memory_budget in (0, 1], got {share}")
            if "kv_cache_memory" in m:
                raise ValueError(f"{f}.memory_share: give memory_share or kv_cache_memory, not both")
        from tokenmill.server.reasoning import REASONING_PARSERS
        from tokenmill.server.tools import PARSERS

        tcp = m.get("tool_call_parser", tool_call_parser)
        if tcp not in ("auto", *PARSERS):
            raise ValueError(f"{f}.tool_call_parser: one of auto, {', '.join(PARSERS)}, got {tcp!r}")
        rp = m.get("reasoning_parser", reasoning_parser)
        if rp is not None and rp not in REASONING_PARSERS:
            raise ValueError(f"{f}.reasoning_parser: one of {', '.join(REASONING_PARSERS)}, got {rp!r}")
        models.append(ModelEntry(name, config, pinned, share, tcp, rp, task))
    tiers = doc.get("tiers") or []
    if not isinstance(tiers, list):
        raise ValueError("tiers: must be a list of {name, route}")
    settings = {}
    for k in ("memory_budget", "host_memory_budget", "load_timeout"):
        if doc.get(k) is not None:
            settings[k] = _number(doc[k], k)
    if doc.get("swap_quantum") is not None:
        settings["swap_quantum"] = _number(doc["swap_quantum"], "swap_quantum", positive=False)
        if settings["swap_quantum"] < 0:
            raise ValueError(f"swap_quantum: must be >= 0, got {doc['swap_quantum']!r}")
    return models, tiers, settings


def build_pool_config(models: list[ModelEntry], raw_tiers: list[dict[str, Any]], pool: PoolConfig,
                      ) -> tuple[list[ModelSpec], list[Tier]]:
    """The pool's model specs, with memory shared out, and its tiers. Every model without its own
    memory_share or kv_cache_memory gets an equal share of the budget (of the CPU's KV cache
    fraction when there is no budget), so that by default all of them fit at once."""
    names = [m.name for m in models]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"models: {dup!r} names two models; give them distinct names (models.yaml `name`)")
    n = len(models)
    budget = pool.memory_budget
    specs = []
    for i, m in enumerate(models):
        cfg = m.config
        if m.memory_share is not None:
            if budget is None:
                raise ValueError(f"models[{i}].memory_share: needs a memory_budget (--memory-budget)")
            cfg = dataclasses.replace(cfg, memory_bytes=int(m.memory_share * budget))
        elif cfg.kv_cache_memory_bytes is None:
            if budget is not None:
                cfg = dataclasses.replace(cfg, memory_bytes=budget // n)
            elif n > 1:
                cfg = dataclasses.replace(cfg, cpu_kv_cache_fraction=cfg.cpu_kv_cache_fraction / n)
        specs.append(ModelSpec(m.name, cfg, m.pinned, m.tool_call_parser, m.reasoning_parser))
    tiers: list[Tier] = []
    for i, t in enumerate(raw_tiers):
        if not isinstance(t, dict) or set(t) - {"name", "route"} or not isinstance(t.get("name"), str):
            raise ValueError(f"tiers[{i}]: must be {{name: ..., route: {{policy: ...}}}}")
        if not t["name"].strip():
            raise ValueError(f"tiers[{i}].name: must be a non-empty string")
        if t["name"] in names:
            raise ValueError(f"tiers[{i}].name: {t['name']!r} is also a model's name")
        if any(x.name == t["name"] for x in tiers):
            raise ValueError(f"tiers[{i}].name: {t['name']!r} names two tiers")
        try:
            policy = policy_from_dict(t.get("route"), set(names))
        except ValueError as e:
            raise ValueError(f"tiers[{i}].{e}") from None
        if isinstance(policy, CascadePolicy):  # (the small model's answer is judged by its tokens' logprobs)
            for role in ("small", "strong"):
                m = models[names.index(getattr(policy, role))]
                if m.task != "generate":
                    kind = "an embedding model" if m.task == "embed" else "a classifier"
                    raise ValueError(f"tiers[{i}].route.{role}: {m.name!r} is {kind} (task {m.task}); a cascade's "
                                     f"models generate text")
        tiers.append(Tier(t["name"], policy))
    return specs, tiers
