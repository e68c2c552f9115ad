"""Configuration dataclasses: what the model is and how the engine runs it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
)
# The bare decoders (no LM head), as embedding checkpoints such as Qwen3-Embedding ship them.
_BASE_MODELS = {a.replace("ForCausalLM", "Model"): a for a in SUPPORTED_ARCHITECTURES}
# The decoders with a classification head (`score`) on the last token: cross-encoder rerankers,
# reward models and classifiers, as transformers' *ForSequenceClassification save them.
_CLASSIFIERS = {a.replace("ForCausalLM", "ForSequenceClassification"): a for a in SUPPORTED_ARCHITECTURES}
# The tasks whose requests are prompts pooled into one vector each, with nothing generated.
POOLING_TASKS = ("embed", "classify")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}


def load_yaml_file(path: str, flag: str) -> Any:
    """A YAML file given by a command-line flag (--models, --tenants): its document, or a
    ValueError naming the flag and the file."""
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{flag}: {path} is not valid YAML: {e}") from None


def read_chat_template(value: str) -> str:
    """A chat template given as a file (its text) or as the Jinja text itself, as vLLM's
    --chat-template takes it; ValueError for a value that is neither."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"chat_template: a file or a Jinja template, got {value!r}")
    if "{" in value:  # (Jinja text: a file name holds no braces)
        return value
    try:
        with open(value, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"chat_template: {value!r} is not a Jinja template, and cannot be read as a file: "
                         f"{e.strerror or e}") from None
    if "{" not in text:
        raise ValueError(f"chat_template: {value} holds no Jinja template")
    return text


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(f"dtype: unsupported dtype {name}; use float32, bfloat16 or float16")
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype: unsupported dtype {name!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only model, read from a Hugging Face config.json.

    One model implementation covers Llama, Qwen2, Qwen3 and Mistral: the families differ
    only in the flags below (biases, q/k norm, sliding windows, tied embeddings).
    """

    path: str
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    # One entry per layer: None for full attention, else the window in tokens.
    sliding_windows: tuple[int | None, ...] = ()
    checkpoint_dtype: torch.dtype = torch.float32
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    has_lm_head: bool = True  # False for a bare decoder (LlamaModel, Qwen3Model): an embedding model
    # A classification head's labels, in order (a *ForSequenceClassification checkpoint's id2label);
    # empty: none. Its weight is `score.weight`, [len(labels), hidden_size].
    labels: tuple[str, ...] = ()
    # classifier_from_token's token ids: `score` is made of these rows of the LM head as it loads (two
    # tokens [no, yes]: one row, yes minus no), and the LM head itself is never allocated.
    label_token_ids: tuple[int, ...] = ()
    problem_type: str | None = None  # a classifier's (config.json): regression, single_ or multi_label_classification
    matryoshka: bool = False  # embeddings may be truncated to fewer dimensions (config's is_matryoshka)

    @property
    def layer_matmul_parameters(self) -> int:
        """Weights of one decoder layer's projections (q, k, v, o, gate, up, down): a token's
        multiply-adds per layer, besides attention."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * (q + 2 * kv) + q * h + 3 * h * i

    @property
    def num_parameters(self) -> int:
        """The model's parameters, from its shape (what a checkpoint of it holds)."""
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_heads * d, self.num_kv_heads * d
        layer = (self.layer_matmul_parameters + 2 * h + self.qkv_bias * (q + 2 * kv) + self.o_bias * h
                 + self.mlp_bias * (2 * i + h) + self.qk_norm * 2 * d)
        heads = 0 if not self.has_lm_head or self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * layer + self.vocab_size * h + heads + h + len(self.labels) * h

    @property
    def max_context(self) -> int:
        """Positions the model was built for: max_position_embeddings, times the factor under linear
        RoPE scaling (llama3 scaling already counts in max_position_embeddings), as vLLM derives it."""
        if self.rope.rope_type == "linear":
            return int(self.max_position_embeddings * self.rope.factor)
        return self.max_position_embeddings

    def check_max_model_len(self, max_model_len: int, allow_long: bool, what: str = "the model") -> None:
        if max_model_len > self.max_context and not allow_long:
            scaling = f" with {self.rope.rope_type} RoPE scaling" if self.rope.rope_type != "default" else ""
            raise ValueError(
                f"max_model_len={max_model_len} exceeds {what}'s context of {self.max_context} positions "
                f"(max_position_embeddings={self.max_position_embeddings}{scaling} in {self.path}/config.json); "
                f"positions beyond it produce garbage. Lower --max-model-len, or pass --allow-long-max-model-len "
                f"(allow_long_max_model_len=True) if you know the model handles them.")

    @classmethod
    def from_pretrained(cls, path: str) -> ModelConfig:
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise ValueError(f"model: {path!r} is not a folder")
        if not os.path.isfile(cfg_file):
            raise ValueError(f"model: {cfg_file} is missing; a model folder needs config.json")
        try:
            with open(cfg_file) as f:
                raw: dict[str, Any] = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"model: {cfg_file} is not valid JSON: {e}") from e
        qc = raw.get("quantization_config")
        if qc:  # (its weights would load cast to float, scales dropped: a model unrelated to the real one)
            method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
            raise ValueError(f"model: {cfg_file} describes a pre-quantized checkpoint (quantization_config, "
                             f"quant_method {method!r}), which tokenmill cannot load; use the unquantized "
                             f"checkpoint (--quantization int8 quantizes it at load)")
        try:
            return cls.from_dict(raw, path)
        except KeyError as e:
            raise ValueError(f"model: {cfg_file} has no {e.args[0]!r}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str = "") -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        base_model = arch is None and any(a in _BASE_MODELS for a in archs)
        if base_model:
            arch = next(_BASE_MODELS[a] for a in archs if a in _BASE_MODELS)
        classifier = arch is None and any(a in _CLASSIFIERS for a in archs)
        if classifier:
            arch = next(_CLASSIFIERS[a] for a in archs if a in _CLASSIFIERS)
        if arch is None:
            raise ValueError(
                f"model: unsupported architecture {archs or raw.get('model_type')!r} in "
                f"{os.path.join(path, 'config.json')}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        model_type = raw.get("model_type", "")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"model: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        head_dim = raw.get("head_dim") or hidden // num_heads
        num_layers = int(raw["num_hidden_layers"])
        is_qwen2 = arch == "Qwen2ForCausalLM"
        is_qwen3 = arch == "Qwen3ForCausalLM"
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            path=path,
            architecture=arch,
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rope=_parse_rope(raw),
            # Qwen2 always has q/k/v biases and no o bias; Llama/Qwen3 follow attention_bias.
            qkv_bias=True if is_qwen2 else attention_bias,
            o_bias=False if is_qwen2 else attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=is_qwen3,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_windows=_parse_sliding_windows(raw, arch, num_layers, path),
            checkpoint_dtype=_checkpoint_dtype(raw),
            eos_token_ids=_as_id_tuple(raw.get("eos_token_id")),
            bos_token_id=raw.get("bos_token_id"),
            has_lm_head=not (base_model or classifier),
            labels=_labels(raw) if classifier else (),
            problem_type=raw.get("problem_type") if classifier else None,
            matryoshka=bool(raw.get("is_matryoshka") or raw.get("matryoshka_dimensions")),
        )


def _labels(raw: dict[str, Any]) -> tuple[str, ...]:
    """A classifier's label names by index: config.json's id2label (its keys are strings of the
    indices), else num_labels of them named LABEL_i, as transformers names them."""
    id2label = raw.get("id2label") or {}
    n = int(raw.get("num_labels") or len(id2label) or 2)
    if id2label:
        n = max(n, 1 + max(int(k) for k in id2label))
    return tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n))


def _as_id_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


def _checkpoint_dtype(raw: dict[str, Any]) -> torch.dtype:
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    try:
        return parse_dtype(name)
    except ValueError:
        return torch.float32


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    # transformers 5.x writes rope_parameters (theta inside); 4.x writes rope_theta + rope_scaling.
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(
            f"model: rope_type {rope_type!r} is not supported yet (supported: default, linear, llama3)"
        )
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


def _parse_sliding_windows(raw: dict[str, Any], arch: str, num_layers: int,
                           path: str = "") -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if not window:
        return (None,) * num_layers
    where = os.path.join(path, "config.json")
    # (transformers refuses these too; loaded, a float broke the CPU kernel and a window below 1
    # meant full attention to some backends and a literal mask to others)
    if isinstance(window, bool) or not isinstance(window, (int, float)) or window != int(window) or window < 1:
        raise ValueError(f"model: sliding_window must be a positive integer, got {window!r} in {where}")
    w = int(window)
    if layer_types:
        if len(layer_types) != num_layers:
            raise ValueError(f"model: layer_types has {len(layer_types)} entries for num_hidden_layers="
                             f"{num_layers} in {where}")
        return tuple(w if t == "sliding_attention" else None for t in layer_types)
    if arch == "MistralForCausalLM":
        return (w,) * num_layers
    if raw.get("use_sliding_window"):
        first = int(raw.get("max_window_layers", 28))  # (transformers' Qwen2/Qwen3 default)
        return tuple(w if i >= first else None for i in range(num_layers))
    return (None,) * num_layers


SPEC_METHODS = ("ngram", "draft_model")


@dataclass
class SpeculativeConfig:
    """Speculative decoding in vLLM's shape: `{"method": "ngram" | "draft_model", "num_speculative_tokens": k,
    "model": ..., "prompt_lookup_max": ..., "prompt_lookup_min": ...}`.

    ngram proposes the k tokens that followed the longest earlier occurrence (in prompt or output) of the
    sequence's last n tokens, prompt_lookup_max >= n >= prompt_lookup_min; draft_model runs a smaller
    checkpoint with the same vocabulary greedily for k tokens. Either way the target model checks the k
    tokens in one forward pass and rejection sampling keeps its output distribution exact.
    """

    method: str
    num_speculative_tokens: int
    model: str | None = None  # draft_model: the draft checkpoint folder
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """From a dict (the LLM keyword) or a JSON string (the CLI flag); raises ValueError naming the field."""
        if value is None:
            return None
        if isinstance(value, SpeculativeConfig):
            value.validate()
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config: not valid JSON: {e}") from e
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config: expected an object, got {type(value).__name__}")
        known = {"method", "num_speculative_tokens", "model", "prompt_lookup_max", "prompt_lookup_min"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown field(s) {unknown}; known: {sorted(known)}")
        method = value.get("method")
        if method is None and value.get("model"):
            method = "draft_model"
        cfg = cls(method=method, num_speculative_tokens=value.get("num_speculative_tokens"),
                  model=value.get("model"), prompt_lookup_max=value.get("prompt_lookup_max"),
                  prompt_lookup_min=value.get("prompt_lookup_min"))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"speculative_config: {msg}")

        if self.method not in SPEC_METHODS:
            raise bad(f"method must be one of {list(SPEC_METHODS)}, got {self.method!r}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16:
            raise bad(f"num_speculative_tokens must be an integer in [1, 16], got {k!r}")
        if self.method == "draft_model":
            if not isinstance(self.model, str) or not self.model:
                raise bad("method 'draft_model' needs 'model' (the draft checkpoint folder)")
            if self.prompt_lookup_max is not None or self.prompt_lookup_min is not None:
                raise bad("prompt_lookup_max/prompt_lookup_min apply to method 'ngram' only")
            return
        if self.model is not None:
            raise bad("'model' applies to method 'draft_model' only")
        # Defaults: n-grams of 4 down to 2 tokens (a single token matches too often to be worth a draft).
        hi, lo = self.prompt_lookup_max, self.prompt_lookup_min
        if hi is None:
            hi = max(4, lo or 0)
        if lo is None:
            lo = min(2, hi)
        for name, v in (("prompt_lookup_max", hi), ("prompt_lookup_min", lo)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 64:
                raise bad(f"{name} must be an integer in [1, 64], got {v!r}")
        if lo > hi:
            raise bad(f"prompt_lookup_min ({lo}) must be <= prompt_lookup_max ({hi})")
        self.prompt_lookup_max, self.prompt_lookup_min = hi, lo


@dataclass
class EngineConfig:
    """How the engine runs: memory, batching and device settings (keyword arguments of `LLM`)."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_memory_bytes: int | None = None
    # Weights and KV cache together (a model pool's share of its budget): the KV cache gets what the
    # loaded weights leave. kv_cache_memory_bytes, when set, takes precedence.
    memory_bytes: int | None = None
    # On CPU without kv_cache_memory_bytes: this fraction of available RAM goes to the KV cache.
    cpu_kv_cache_fraction: float = 0.25
    # On GPU: the fraction of device memory the engine may use in total (weights + activations + KV).
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    # Reuse the KV of full blocks across requests that share a prefix (vLLM's name; on by default).
    enable_prefix_caching: bool = True
    # "auto": "cpu" (tokenmill's kernels, PyTorch ops where they cannot be built) on CPU; on CUDA "triton"
    # (a Triton kernel for decodes, SDPA for prefill) where triton is installed, else "torch".
    attention_backend: str = "auto"
    # CUDA graphs for decode-only steps (engine/cuda_graphs.py): "auto" (on CUDA with the triton backend),
    # "on" (the same, an error where it cannot be), "off" (vLLM's enforce_eager), or "padded" (the graphs'
    # static buffers and padding without capture, on any device: what tests run on a CPU).
    cuda_graphs: str = "auto"
    # The decode batch sizes captured (None: 1, 2, 4 and every multiple of 8 up to max_num_seqs, at most 512).
    cuda_graph_sizes: list[int] | None = None
    # Async scheduling (LLMEngine._step_async): each step is scheduled and queued while the one before
    # it still runs on the device. "auto": on CUDA (a CPU runs a step as it is queued: nothing to
    # overlap); "on": on any device (what tests run on a CPU); "off". Not with speculative decoding
    # or an embedding model.
    async_scheduling: str = "auto"
    # Weight quantization at load from a float checkpoint: None or "int8" (per-output-channel scales).
    quantization: str | None = None
    # "auto": the folder's safetensors; "dummy": random weights made on the device from config.json alone
    # (vLLM's --load-format dummy: for benchmarks of shapes whose checkpoint is not at hand).
    load_format: str = "auto"
    # On CPU: a second copy of the float32/bfloat16 weights in oneDNN's blocked layout for steps of more than
    # a few rows (batched decode, prefill), 1.3-2.5x faster GEMMs for the weights' memory again.
    # None: on when the copy takes at most a quarter of the available RAM.
    prepack_weights: bool | None = None
    # "generate", "embed" (last-token pooling, L2-normalized: /v1/embeddings), "classify" (a classification
    # head on the last token: /classify, /score, /rerank) or "auto": classify for a *ForSequenceClassification
    # checkpoint or with classifier_from_token, embed for a bare decoder (Qwen3Model, ...) or a
    # sentence-transformers folder, generate otherwise.
    task: str = "auto"
    # A causal LM run as a classifier whose labels are these tokens' logits (vLLM's classifier_from_token):
    # two tokens [no, yes] make one label, the second's probability against the first alone (vLLM's
    # from_2_way_softmax: how Qwen3-Reranker and mxbai-rerank-v2 score a query and document); more make one
    # label per token, softmaxed among them.
    classifier_from_token: list[str] | None = None
    # Accept a max_model_len beyond the model's positions (vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN).
    allow_long_max_model_len: bool = False
    # Speculative decoding (vLLM's shape, see SpeculativeConfig): a dict, a JSON string or None.
    speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None
    tokenizer: str | None = None
    # The chat template, replacing the tokenizer's (vLLM's --chat-template): a file, or the Jinja text itself.
    # validate() reads a file's text into it.
    chat_template: str | None = None
    # Default sampling settings, as vLLM's --generation-config: "auto" takes temperature, top_p, top_k,
    # min_p, repetition_penalty and max_new_tokens from the model folder's generation_config.json for
    # requests that leave them out; "vllm" uses the API's own defaults; a folder, its file.
    generation_config: str = "auto"
    load_progress: bool = False  # a progress bar on stderr while the weights load (the CLI turns it on)
    # The scheduler's order: "fcfs", "priority" (vLLM's: lower first, then arrival) or "slo" (latency
    # targets; engine/scheduler.py). With all priorities equal, priority is fcfs.
    scheduling_policy: str = "priority"
    # slo policy, a request whose TTFT target the queue makes unreachable: "reject" (the server answers
    # 429 with the reason), "demote" (it runs as best effort and counts as missed) or "off".
    slo_admission: str = "demote"
    # slo policy: measure the step-time model at startup with a few synthetic steps (else it starts from
    # defaults and learns from the first requests' steps).
    calibrate_step_model: bool = True
    # Energy and cost per request (tokenmill/ops/energy.py): the energy counter ("auto": nvml on CUDA, rapl
    # on the CPU, else the power model), the power model's watts (None: its defaults), and the prices.
    energy_source: str = "auto"
    power_idle_watts: float | None = None  # the model's idle draw (default: 1.5 W per CPU thread; 50 W a GPU)
    power_watts: float | None = None  # the model's busy draw per busy CPU thread (default 5 W), or per GPU (250 W)
    price_per_device_hour: float = 0.0  # $ per hour of device time (the machine's or the GPU's rental)
    price_per_kwh: float = 0.0  # $ per kWh
    pue: float = 1.0  # power usage effectiveness: the facility's energy per joule the device draws

    def validate(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be positive, got {self.memory_bytes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.task not in ("auto", "generate", "embed", "classify"):
            raise ValueError(f"task: must be auto, generate, embed or classify, got {self.task!r}")
        tokens = self.classifier_from_token
        if tokens is not None:
            if (not isinstance(tokens, (list, tuple)) or len(tokens) < 2
                    or not all(isinstance(t, str) and t for t in tokens)):
                raise ValueError(f"classifier_from_token: two or more tokens (strings), got {tokens!r}")
            if len(set(tokens)) != len(tokens):
                raise ValueError(f"classifier_from_token: a token is given twice in {tokens!r}")
            if self.task not in ("auto", "classify"):
                raise ValueError(f"classifier_from_token: makes a classifier; task {self.task!r} contradicts it")
        if self.quantization is not None and self.quantization not in ("int8",):
            raise ValueError(f"quantization: unknown method {self.quantization!r}; available: int8")
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.chat_template is not None:
            self.chat_template = read_chat_template(self.chat_template)
        if not 0 < self.cpu_kv_cache_fraction < 1:
            raise ValueError(f"cpu_kv_cache_fraction must be in (0, 1), got {self.cpu_kv_cache_fraction}")
        if self.scheduling_policy not in ("fcfs", "priority", "slo"):
            raise ValueError(f"scheduling_policy: must be fcfs, priority or slo, got {self.scheduling_policy!r}")
        if self.generation_config not in ("auto", "vllm") and not os.path.isdir(self.generation_config):
            raise ValueError(f"generation_config: 'auto' (the model folder's), 'vllm' (none) or a folder holding "
                             f"generation_config.json, got {self.generation_config!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format: must be auto or dummy, got {self.load_format!r}")
        if self.async_scheduling not in ("auto", "on", "off"):
            raise ValueError(f"async_scheduling: must be auto, on or off, got {self.async_scheduling!r}")
        if self.cuda_graphs not in ("auto", "on", "off", "padded"):
            raise ValueError(f"cuda_graphs: must be auto, on, off or padded, got {self.cuda_graphs!r}")
        sizes = self.cuda_graph_sizes
        if sizes is not None and (not sizes or not all(type(x) is int and x > 0 for x in sizes)):
            raise ValueError(f"cuda_graph_sizes: must be positive batch sizes, got {self.cuda_graph_sizes!r}")
        if self.slo_admission not in ("reject", "demote", "off"):
            raise ValueError(f"slo_admission: must be reject, demote or off, got {self.slo_admission!r}")
        from tokenmill.ops.energy import check_config

        check_config(self.energy_source, self.power_idle_watts, self.power_watts, self.price_per_device_hour,
                     self.price_per_kwh, self.pue)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device: {self.device!r} is not a device (cpu, cuda, cuda:N or auto)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: 'cuda' was asked for but no CUDA device is available")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device: {self.device!r} is not supported (cpu, cuda or auto)")
        return dev

    def resolve_attention_backend(self, device: torch.device) -> str:
        if self.attention_backend == "auto":
            if device.type == "cpu":
                return "cpu"
            import importlib.util

            # (the kernel's tiles want a power-of-two block of at least 16 tokens)
            ok = importlib.util.find_spec("triton") is not None and self.block_size >= 16
            return "triton" if ok else "torch"
        if (self.attention_backend == "triton" and device.type != "cuda"
                and os.environ.get("TRITON_INTERPRET") != "1"):  # (every step would fail: no GPU driver)
            raise ValueError(f"attention_backend: 'triton' runs on CUDA (or under TRITON_INTERPRET=1, for "
                             f"tests); this engine runs on {device.type}")
        return self.attention_backend

    def resolve_async_scheduling(self, device: torch.device, task: str) -> bool:
        if self.async_scheduling == "off":
            return False
        why = ("speculative decoding" if self.speculative_config is not None
               else "an embedding model" if task == "embed" else "a classifier" if task == "classify" else None)
        if why is not None:
            if self.async_scheduling == "on":
                raise ValueError(f"async_scheduling: 'on' does not work with {why} (use auto or off)")
            return False
        return self.async_scheduling == "on" or device.type == "cuda"

    def resolve_cuda_graphs(self, device: torch.device, backend: str) -> str:
        """"capture", "padded" or "off" for this device and attention backend."""
        if self.cuda_graphs == "off":
            return "off"
        if self.cuda_graphs == "padded":
            if backend != "triton":  # the torch backend would gather max_model_len keys for every row
                raise ValueError(f"cuda_graphs: 'padded' needs the triton attention backend, got {backend!r}")
            return "padded"
        if device.type == "cuda" and backend == "triton":
            return "capture"
        if self.cuda_graphs == "on":
            raise ValueError(f"cuda_graphs: 'on' needs a CUDA device and the triton attention backend, "
                             f"got {device.type} with {backend!r} (use auto, off or padded)")
        return "off"

    def resolve_dtype(self, model_config: ModelConfig, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return model_config.checkpoint_dtype if device.type == "cuda" else torch.float32
        return parse_dtype(self.dtype)
