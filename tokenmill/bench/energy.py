"""`tokenmill bench energy`: energy, device time and FLOPs per output token on a fixed workload.

Each model runs the same offline workload (random token-id prompts of mixed lengths, a fixed
number of output tokens each, all submitted at once, prefix caching off) through `LLM.generate`
with the engine's energy accounting (tokenmill/ops/energy.py), and reports per output token the
energy measured over the engine's steps, the same with the energy between steps added, device
seconds and FLOPs (prefill included), with the meter's source and the error bound of the figure:

- model (a power model, where no counter is readable): its figure is as good as its watts. The
  bound is the range the same run gives for CPUs drawing 3.5 to 7 W per busy core and 1 to 2 W
  of idle share per core (TDP over cores of current server parts), against the default 5 W and
  1.5 W. DRAM power is not in the model.
- rapl: the counter's 15.3 uJ unit is negligible; it updates about every 1 ms, so each step's
  two readings may each miss up to 1 ms of energy, which then falls to the gap next to the step:
  a bound of 2 ms x steps over the steps' time, relative. The package's energy between steps
  (idle, the host's work) is reported apart, as the unattributed share.
- nvml: the same with the GPU counter (1 mJ unit, an update period taken as 20 ms).

How each step is split among its requests rests on the step-time model's measured costs (fitted
before the run, as a server's calibration does, and online during it); its in-sample error on the
run's steps (median relative error of the predicted step time) is reported as the attribution's
error. Models: "demo" (the demo model in the package), "smollm"
(a random model of SmolLM-135M's shape, built in --cache-dir), or a model folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

from tokenmill.bench import write_json
from tokenmill.bench.datasets import token_id_requests
from tokenmill.bench.workload import make_random_model

# The power model's plausible range per CPU core: (idle share, busy) watts, low and high.
CPU_IDLE_RANGE_W, CPU_BUSY_RANGE_W = (1.0, 2.0), (3.5, 7.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=None,
                   help="demo, smollm (a random SmolLM-135M-shaped model) or a model folder; repeat for several "
                        "(default: demo and smollm)")
    p.add_argument("--cache-dir", default=None, help="where the smollm model is written (default: a temp dir)")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--input-len", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"),
                   help="prompt lengths, uniform in [MIN, MAX]")
    p.add_argument("--output-len", type=int, default=64, help="tokens generated per request")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--energy-source", default="auto", choices=["auto", "rapl", "nvml", "model"])
    p.add_argument("--power-watts", type=float, default=None, help="the power model's busy watts per thread")
    p.add_argument("--power-idle-watts", type=float, default=None, help="the power model's idle watts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures to this file")


def resolve_model(spec: str, cache_dir: str | None) -> tuple[str, str]:
    """(label, folder) of a --model value."""
    from tokenmill.llm import default_model_path

    if spec == "demo":
        return "demo", default_model_path()
    if spec == "smollm":
        path = os.path.join(cache_dir or tempfile.mkdtemp(prefix="tokenmill-energy-"), "smollm-135m-shape")
        return "smollm-135m-shape", make_random_model(path)
    return os.path.basename(os.path.normpath(spec)), spec


def measure(label: str, model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    from tokenmill import LLM, SamplingParams

    llm = LLM(model_dir, device=args.device, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False, seed=args.seed,
              energy_source=args.energy_source, power_watts=args.power_watts, power_idle_watts=args.power_idle_watts,
              max_model_len=max(args.input_len) + args.output_len + 16)
    eng = llm.engine
    mc = eng.model_config
    acc = eng.energy
    meter = acc.meter
    reqs = token_id_requests(args.num_requests, tuple(args.input_len), (args.output_len, args.output_len),
                             mc.vocab_size, args.seed)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate({"prompt_token_ids": reqs[0].prompt[:16]}, SamplingParams(max_tokens=4))  # warm-up
    fit_step_model(llm, reqs)

    errors: list[float] = []
    hook = eng.on_step

    def on_step(sched: Any, rows: Any, seconds: float) -> None:  # rows: step_features, [chunks, 3]
        tokens, sampled, attn = rows.sum(axis=0).tolist()
        errors.append(abs(eng.step_model.predict(tokens, sampled, attn) - seconds) / seconds)
        hook(sched, rows, seconds)  # type: ignore[misc]

    eng.on_step = on_step
    before = acc.totals()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": r.prompt} for r in reqs], params)
    wall = time.perf_counter() - t0
    after = acc.totals()
    eng.on_step = hook
    d = {k: after[k] - before[k] for k in ("steps", "step_joules", "attributed_joules", "step_seconds", "flops",
                                           "idle_joules")}
    out_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    req_joules = sum(o.compute["energy_joules"] for o in outs)
    req_seconds = sum(o.compute["device_seconds"] for o in outs)
    by_len = sorted(outs, key=lambda o: len(o.prompt_token_ids))
    j = d["step_joules"]
    res: dict[str, Any] = {
        "model": label, "path": model_dir, "energy_source": acc.source, "meter": meter.describe(),
        "shape": {"layers": mc.num_layers, "hidden": mc.hidden_size, "heads": mc.num_heads,
                  "kv_heads": mc.num_kv_heads, "vocab": mc.vocab_size,
                  "non_embedding_params": acc.flop_model.per_token // 2},
        "threads": _threads(), "requests": len(outs), "prompt_tokens": prompt_tokens, "output_tokens": out_tokens,
        "steps": d["steps"], "wall_s": wall, "step_s": d["step_seconds"], "step_joules": j,
        "between_steps_joules": d["idle_joules"],
        "joules_per_output_token": j / out_tokens,
        "joules_per_output_token_with_idle": (j + d["idle_joules"]) / out_tokens,
        "device_seconds_per_output_token": d["step_seconds"] / out_tokens,
        "flops_per_output_token": d["flops"] / out_tokens,
        "achieved_flops_per_s": d["flops"] / d["step_seconds"] if d["step_seconds"] else 0.0,
        "mean_watts_in_steps": j / d["step_seconds"] if d["step_seconds"] else 0.0,
        "unattributed_share": d["idle_joules"] / (j + d["idle_joules"]) if j + d["idle_joules"] else 0.0,
        "attribution_sum_error": abs(req_joules - j) / j if j else 0.0,
        "device_seconds_sum_error": abs(req_seconds - d["step_seconds"]) / d["step_seconds"],
        "attribution_model_error": statistics.median(errors) if errors else None,
        "shortest_prompt": {"tokens": len(by_len[0].prompt_token_ids), **by_len[0].compute},
        "longest_prompt": {"tokens": len(by_len[-1].prompt_token_ids), **by_len[-1].compute},
    }
    res["bound"] = _bound(res, meter)
    return res


def fit_step_model(llm: Any, reqs: list) -> None:
    """Measures the step-time model whose costs split each step, as a server's startup does: the
    engine's own calibration where it has one, else two passes over a quarter of the workload,
    the first fit becoming the second's prior (the online fit alone stays near the default prior
    for a model far slower or faster than it)."""
    from tokenmill import SamplingParams

    eng = llm.engine
    if hasattr(eng, "calibrate"):
        eng.calibrate()
        return
    few = [{"prompt_token_ids": r.prompt} for r in reqs[: max(2, len(reqs) // 4)]]
    for _ in range(2):
        llm.generate(few, SamplingParams(max_tokens=8, ignore_eos=True))
        eng.step_model.set_prior(tuple(eng.step_model.fit()))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _bound(res: dict[str, Any], meter: Any) -> dict[str, Any]:
    """The figure's error bound, by source (see the module docstring)."""
    j, steps, step_s, tokens = res["step_joules"], res["steps"], res["step_s"], res["output_tokens"]
    if res["energy_source"] == "model":
        if meter.unit != "thread":
            return {"kind": "model", "note": "a GPU's power model: no range known; set --power-watts for the GPU"}
        threads = res["threads"]
        # The steps' energy is idle x their wall time + busy x the CPU seconds they ran: the latter
        # from the former (the meter's reads bracket the step's timer within microseconds).
        cpu_s = max(0.0, j - meter.idle_watts * step_s) / meter.busy_watts if meter.busy_watts else 0.0
        res["cpu_seconds_in_steps"] = cpu_s
        lo = (CPU_IDLE_RANGE_W[0] * threads * step_s + CPU_BUSY_RANGE_W[0] * cpu_s) / tokens
        hi = (CPU_IDLE_RANGE_W[1] * threads * step_s + CPU_BUSY_RANGE_W[1] * cpu_s) / tokens
        mid = res["joules_per_output_token"]
        return {"kind": "model", "joules_per_output_token_range": [lo, hi],
                "relative": [lo / mid - 1, hi / mid - 1],
                "note": f"CPUs drawing {CPU_BUSY_RANGE_W[0]:g}-{CPU_BUSY_RANGE_W[1]:g} W per busy core and "
                        f"{CPU_IDLE_RANGE_W[0]:g}-{CPU_IDLE_RANGE_W[1]:g} W idle share per core; DRAM not modelled"}
    period = meter.update_period_s
    rel = min(1.0, 2 * period * steps / step_s) if step_s else 1.0
    return {"kind": res["energy_source"], "counter_resolution_joules": meter.resolution_joules,
            "update_period_s": period, "step_boundary_relative": rel,
            "unattributed_share": res["unattributed_share"],
            "note": f"each step's readings may miss up to {period * 1000:g} ms of energy each, moved to the gap "
                    f"beside it: at most {rel:.1%} of the steps' energy"}


def report(r: dict[str, Any]) -> str:
    s = r["shape"]
    b = r["bound"]
    lines = [
        f"{r['model']}: {s['layers']} layers, hidden {s['hidden']}, {s['non_embedding_params'] / 1e6:.1f}M "
        f"non-embedding params, vocab {s['vocab']}; {r['threads']} threads; energy source {r['energy_source']}",
        f"  {r['requests']} requests, {r['prompt_tokens']} prompt and {r['output_tokens']} output tokens, "
        f"{r['steps']} steps, {r['wall_s']:.2f} s wall, {r['step_s']:.2f} s in steps",
        f"  energy per output token: {r['joules_per_output_token']:.4g} J over the steps, "
        f"{r['joules_per_output_token_with_idle']:.4g} J with the energy between steps "
        f"({r['unattributed_share']:.1%} unattributed); mean {r['mean_watts_in_steps']:.1f} W in steps",
        f"  device seconds per output token: {r['device_seconds_per_output_token'] * 1000:.3f} ms; "
        f"FLOPs per output token: {r['flops_per_output_token']:.3g} (prefill included); "
        f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s achieved",
    ]
    if b["kind"] == "model" and "joules_per_output_token_range" in b:
        lo, hi = b["joules_per_output_token_range"]
        lines.append(f"  error bound (model): {lo:.4g} to {hi:.4g} J/token ({b['relative'][0]:+.0%} / "
                     f"{b['relative'][1]:+.0%}) for {b['note']}")
    else:
        lines.append(f"  error bound ({b['kind']}): {b['note']}")
    lines.append(f"  attribution: step-time model median error {r['attribution_model_error']:.1%}; per-request "
                 f"energies sum to the measured total within {r['attribution_sum_error']:.1e} (relative); "
                 f"shortest prompt ({r['shortest_prompt']['tokens']} tokens) "
                 f"{r['shortest_prompt']['energy_joules']:.3g} J, longest ({r['longest_prompt']['tokens']}) "
                 f"{r['longest_prompt']['energy_joules']:.3g} J")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for spec in args.model or ["demo", "smollm"]:
        label, path = resolve_model(spec, args.cache_dir)
        r = measure(label, path, args)
        print(report(r), flush=True)
        results.append(r)
    out = {"workload": {"num_requests": args.num_requests, "input_len": list(args.input_len),
                        "output_len": args.output_len, "max_num_seqs": args.max_num_seqs}, "results": results}
    write_json(args.json, out)
    return out
