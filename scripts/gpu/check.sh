#!/usr/bin/env bash
# Run ON the lent GPU machine (the device tool's `run`, carry [".whl"] made by scripts/gpu/wheels.sh),
# from the repository root. Stages run in the order given, all within one call's 10 minutes (580 s
# shared: each gets what the ones before left), so that a call can hold several short ones:
#   bash scripts/gpu/check.sh tests        the CUDA-specific tests, then the engine suite on CUDA
#   bash scripts/gpu/check.sh kernels      the Triton kernels' registers and spills as compiled there, and
#                                          bench attention (torch vs the triton tilings, bandwidth achieved)
#   bash scripts/gpu/check.sh latency      batch-1 decode of a Llama-3-8B shape, bf16: bandwidth achieved
#   bash scripts/gpu/check.sh qwen         offline throughput, Qwen2.5-0.5B shape, against transformers, and
#                                          async scheduling on against off
#   bash scripts/gpu/check.sh llama        the same on the Llama-3-8B shape
#   bash scripts/gpu/check.sh spec         bench spec-decode: the chain model with chain_small drafting (draft-model
#                                          graphs), and n-gram drafts on the Llama-3-8B shape in bf16
#   bash scripts/gpu/check.sh prefix       bench prefix-cache (shared-prefix and multi-turn, cache on and off)
#   bash scripts/gpu/check.sh slo          bench slo (fcfs vs slo at 2x capacity) on the GPU
# Logs and JSON go to $OUT (what the tool brings back); docs/benchmarks/gpu.md says what to record.
set -uo pipefail
[ $# -gt 0 ] || { echo "stages: tests, kernels, latency, qwen, llama, spec, prefix, slo"; exit 2; }
deadline=$((SECONDS + 580))
OUT=${OUT:-/tmp/tokenmill-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheels missing: run scripts/gpu/wheels.sh here and carry .whl"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi -L
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())"
left() { echo $((deadline - SECONDS)); }
rc=0
# step LOG CMD...: run CMD within the time left, its output shown and appended to $OUT/LOG; a
# failure or a timeout sets rc (every command's, not only a stage's last).
step() {
  local log=$1; shift
  local t; t=$(left)
  if [ "$t" -le 5 ]; then echo "no time left for: $*" | tee -a "$OUT/$log"; rc=124; return; fi
  timeout "$t" "$@" 2>&1 | tee -a "$OUT/$log"
  local st=${PIPESTATUS[0]}
  [ "$st" -eq 0 ] || rc=$st
}
for stage in "$@"; do
[ "$(left)" -gt 20 ] || { echo "no time left for $stage"; rc=124; break; }
echo "=== $stage ($(left) s left)"
case $stage in
  kernels)
    step kernels_aot.log python3 -m tokenmill.attention.triton_aot
    # What an NVML energy read costs and how often the counter moves (NvmlMeter reads it at most
    # every update_period_s / 2).
    step kernels.log python3 -c "
import time, pynvml
pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0); f = pynvml.nvmlDeviceGetTotalEnergyConsumption
v, t = [], time.perf_counter()
while time.perf_counter() - t < 0.5: v.append(f(h))
dt = time.perf_counter() - t
print(f'nvml energy read: {dt / len(v) * 1e6:.1f} us a call; {len(set(v))} values in {dt * 1e3:.0f} ms')"
    for shape in llama3-8b qwen2.5-0.5b; do
      step kernels.log python3 -m tokenmill.cli bench attention --shape $shape --dtype bfloat16 \
        --json "$OUT/attention_$shape.json"
    done
    ;;
  tests)
    # The CUDA code first (kernel against torch, graph replay against eager, memory sizing), then the
    # suite's engine tests, which run on the GPU by default (device "auto").
    # Not -x: a failure should not hide what follows it (one GPU session is all there is).
    step tests.log python3 -m pytest -q --maxfail=15 --durations=15 -p no:cacheprovider -o addopts="" \
      tests/test_triton_attention.py tests/test_gpu_ops.py tests/test_cuda_graphs.py tests/test_gpu_memory.py \
      tests/test_input_batch.py tests/test_parity.py \
      tests/test_engine.py tests/test_sampler.py tests/test_loading.py tests/test_prefix_cache_blocks.py \
      tests/test_async_scheduling.py
    ;;
  latency)
    step latency.log python3 -m tokenmill.cli bench latency --model /tmp/llama3-8b --shape llama3-8b \
      --load-format dummy --device cuda --dtype bfloat16 --prompt-len 512 --decode-tokens 128 --repeats 3 \
      --json "$OUT/latency_llama3_8b_bf16.json"
    ;;
  qwen)
    step qwen.log python3 -m tokenmill.cli bench throughput --model /tmp/qwen2.5-0.5b --shape qwen2.5-0.5b \
      --load-format dummy --device cuda --dtype bfloat16 --num-prompts 1024 --input-len 32 512 \
      --output-len 16 256 --max-num-seqs 256 --max-num-batched-tokens 8192 --hf-batch-sizes 256,512,1024 \
      --decode-tokens 128 --peak-tflops 989.4 --async-ab 1 --ab-top-p 0.95 \
      --json "$OUT/throughput_qwen2.5_0.5b.json"
    ;;
  llama)
    step llama.log python3 -m tokenmill.cli bench throughput --model /tmp/llama3-8b --shape llama3-8b \
      --load-format dummy --device cuda --dtype bfloat16 --num-prompts 512 --input-len 32 512 \
      --output-len 16 256 --max-num-seqs 256 --max-num-batched-tokens 8192 --hf-batch-sizes 128,256,512 \
      --decode-tokens 64 --peak-tflops 989.4 --json "$OUT/throughput_llama3_8b.json"
    ;;
  spec)
    step spec.log python3 -m tokenmill.cli bench spec-decode --model tokenmill/demo_models/chain --workload chain \
      --device cuda --num-prompts 8 --max-tokens 400 --json "$OUT/spec_chain_draft.json" --speculative-config \
      '{"method": "draft_model", "model": "tokenmill/demo_models/chain_small", "num_speculative_tokens": 4}'
    step spec.log python3 -m tokenmill.cli bench spec-decode --model /tmp/llama3-8b --shape llama3-8b \
      --load-format dummy --device cuda --dtype bfloat16 --workload random --num-prompts 4 --prompt-len 256 \
      --max-tokens 128 --json "$OUT/spec_llama3_8b_ngram.json" \
      --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'
    ;;
  prefix)
    # A Qwen2.5-0.5B-shaped random checkpoint (SmolLM-135M's prefill is too short on an H200 for the
    # cache's gain to show past HTTP and host work)
    step prefix.log python3 -c "from tokenmill.bench.workload import make_random_model as m
m('/tmp/qwen2.5-0.5b-ckpt', shape_name='qwen2.5-0.5b')"
    step prefix.log python3 -m tokenmill.cli bench prefix-cache --model /tmp/qwen2.5-0.5b-ckpt --device cuda \
      --dtype bfloat16 --kv-cache-memory 8 --json "$OUT/prefix_cache_gpu.json"
    ;;
  slo)
    step slo.log python3 -m tokenmill.cli bench slo --duration 60 --json "$OUT/slo_gpu.json" --log-dir "$OUT/slo_logs"
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
done
exit $rc
