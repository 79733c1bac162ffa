"""Plan a whole RL step: per-device bytes of every piece, and whether it fits.

  python experiments/plan_rl.py --model=qwen2.5-7b --gpus=8 [--simulator=qwen2.5-14b]
  python experiments/plan_rl.py --all --out=experiments/results/plan_rl   # the committed table

For a policy (``configs/zerosearch.py:<model>``: the paper's 64 prompts x 5
samples, 4096-token context, micro-batches of 16, scoring in chunks of 32) and a
simulator on the same devices, with params, optimizer state and batches sharded
over ``--gpus`` devices (``fsdp``: params and optimizer state over every device,
batch rows over every device), the per-device bytes of:

  policy params (float32), AdamW state (two float32 moments), the frozen
  reference (``rl.reference_dtype``: float32 or bfloat16), the simulator (bfloat16), the policy's KV cache
  for every rollout row at the full context (bfloat16), the simulator's KV cache
  (prefix + 600 new tokens, bfloat16; a wave's rows with ``rollout.waves``), and the temporaries of the scoring pass
  and of one micro-batch update, these two from XLA: the programs are compiled
  on the CPU from abstract inputs over ``--gpus`` fake devices and their memory
  analysis read (nothing is allocated).

The step's peak is the larger of its phases: rollout (states + both caches),
scoring (states + scoring temporaries) and update (states + update
temporaries). With ``rl.offload_reference`` / ``rl.offload_optimizer`` the
reference is on the devices only while scoring, the AdamW state only while
updating (host memory the rest of the step; ``--compare_options`` plans each
option beside the config's). The table says whether that fits an 80 GB H100, a 141 GB H200
and a 16 GB TPU v5e chip, and the largest rollout batch (rows, a multiple of
the device count) that would fit each with 10% headroom. CPU compiles fuse
differently from GPU ones: treat the compiled temporaries as estimates. The
last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "tests"))

DEVICES_GB = {"H100 80GB": 80, "H200 141GB": 141, "TPU v5e 16GB": 16}
GB = 1e9


def shape(name: str) -> dict:
  """ModelConfig fields of ``name`` (``bench_sharding.MODELS``)."""
  import bench_sharding

  return bench_sharding.MODELS[name]


def cache_bytes(cfg, rows: int, length: int, itemsize: int = 2) -> float:
  return 2.0 * cfg.num_layers * rows * length * cfg.num_kv_heads * cfg.head_dim * itemsize


def compiled_temps(cfg, plan, r, length: int) -> dict:
  """Temporaries (bytes per device) of the chunked scoring pass and of one
  micro-batch update, from the compiled programs' memory analysis."""
  import functools

  import jax
  import jax.numpy as jnp

  from zsjax import rl_step, train_step as T
  from zsjax.rl_settings import RLSettings
  from zsjax.model import token_log_probs

  programs = rl_step.build_programs(RLSettings.from_config(r), cfg, plan, 1.0)
  abstract = lambda tree, shardings: jax.tree_util.tree_map(  # noqa: E731
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
  state = programs.state_target().policy
  n_score = r.score_batch_size * plan.batch_divisor  # one chunk on every device
  row2 = plan.rows(2)
  tok = jax.ShapeDtypeStruct((n_score, length), jnp.int32, sharding=row2)
  score = T.make_chunked_score_fn(functools.partial(token_log_probs, cfg, temperature=1.0), plan,
                                  programs.shardings.params, r.score_batch_size)
  score_mem = score.lower(state.params, tok, tok).compile().memory_analysis()
  m = r.micro_batch_size * plan.batch_divisor
  batch = rl_step.RLBatch(*[jax.ShapeDtypeStruct(
      (m, length), jnp.float32 if name in ("old_logp", "ref_logp", "advantages", "returns",
                                           "old_values") else jnp.int32, sharding=row2)
      for name in (f.name for f in rl_step.dataclasses.fields(rl_step.RLBatch))])
  update_mem = programs.update.lower(state, batch, jax.eval_shape(
      lambda: jax.random.key(0))).compile().memory_analysis()
  return {"score_temp": float(score_mem.temp_size_in_bytes),
          "update_temp": float(update_mem.temp_size_in_bytes)}


# What rl.reference_dtype / rl.offload_reference / rl.offload_optimizer buy, planned
# side by side by --compare_options: (name, reference dtype, offload reference, offload
# optimizer). None takes the config's value.
OPTIONS = {"config": (None, None, None), "f32_reference": ("float32", False, False),
           "bf16_reference": ("bfloat16", False, False),
           "bf16_reference+offload": ("bfloat16", True, True)}


def apply_overrides(config, overrides: dict) -> None:
  """``{"rl.micro_batch_size": "4", ...}`` into ``config``, typed as the field is."""
  for dotted, text in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    if leaf not in node:
      raise ValueError(f"--set {dotted}: no such config field")
    old = node[leaf]
    node[leaf] = text if isinstance(old, str) else type(old)(json.loads(text.lower()
                                                                       if isinstance(old, bool)
                                                                       else text))


def plan_one(model: str, simulator: str, devices, rows: int | None = None,
             logits_chunk: int = -1, options: str = "config", temps: dict | None = None,
             overrides: dict | None = None) -> dict:
  import dataclasses

  from config_files import load_config
  from zsjax.model import ModelConfig, count_params, param_shapes
  from zsjax.sharding import ShardingPlan

  config = load_config("zerosearch", model)
  apply_overrides(config, overrides or {})
  r, ro = config.rl, config.rollout
  waves = ro.waves
  chunk = config.policy.logits_chunk if logits_chunk < 0 else logits_chunk
  cfg = dataclasses.replace(ModelConfig.from_dict(shape(model)), dtype="bfloat16",
                            param_dtype="float32", remat="full", logits_chunk=chunk)
  gpus = len(devices)
  plan = ShardingPlan.from_config({"mesh": {"data": 1, "fsdp": -1, "tensor": 1},
                                   "sharding": "fsdp", "sharding_rules": ()}, devices=devices)
  n = count_params(param_shapes(cfg))
  rows = rows or r.prompts_per_step * r.samples_per_prompt
  ref_dtype, off_ref, off_opt = (
      value if value is not None else default for value, default in
      zip(OPTIONS[options], (r.get("reference_dtype", ""), r.get("offload_reference", False),
                             r.get("offload_optimizer", False))))
  ref_bytes = 2.0 if ref_dtype in ("bfloat16", "float16") else 4.0  # "": the policy's f32
  per_device = {
      "policy_params": 4.0 * n / gpus, "optimizer": 8.0 * n / gpus,
      "reference": ref_bytes * n / gpus,
      "policy_cache": cache_bytes(cfg, rows, ro.max_length) / gpus}
  if simulator != "none":
    sim = ModelConfig.from_dict(shape(simulator))
    per_device["simulator"] = 2.0 * count_params(param_shapes(sim)) / gpus
    per_device["simulator_cache"] = cache_bytes(
        sim, rows, config.simulator.max_prefix_tokens + config.simulator.max_new_tokens) / gpus
  per_device.update(temps or compiled_temps(cfg, plan, r, ro.max_length))
  # on the devices throughout: the policy, the simulator, and what is not offloaded; an
  # offloaded reference is on them for the scoring pass, offloaded optimizer states for
  # the update (zsjax.rl_step)
  ref, opt = per_device["reference"], per_device["optimizer"]
  states = (per_device["policy_params"] + per_device.get("simulator", 0.0)
            + (0.0 if off_ref else ref) + (0.0 if off_opt else opt))
  caches_per_row = (per_device["policy_cache"] + per_device.get("simulator_cache", 0.0)) / rows
  phases = {"rollout": states + caches_per_row * rows / waves,  # a wave's caches are live
            "scoring": states + (ref if off_ref else 0.0) + per_device["score_temp"],
            "update": states + (opt if off_opt else 0.0) + per_device["update_temp"]}
  peak = max(phases.values())
  fits, largest = {}, {}
  for device, gb in DEVICES_GB.items():
    budget = 0.9 * gb * GB
    fits[device] = peak <= budget
    # the rollout's caches sit beside the states only; scoring and update must fit too
    room = budget - states if max(phases["scoring"], phases["update"]) <= budget else 0.0
    best = int(room // (caches_per_row * gpus)) * gpus * waves if room > 0 else 0
    largest[device] = max(best, 0)
  return {"model": model, "simulator": simulator, "gpus": gpus, "rollout_rows": rows,
          "logits_chunk": chunk, "options": options, "reference_dtype": ref_dtype or "float32",
          "settings": dict(overrides or {}), "waves": waves,
          "offload": "+".join(x for x, on in (("reference", off_ref), ("optimizer", off_opt))
                              if on) or "none",
          "host_gb": ((ref if off_ref else 0.0) + (opt if off_opt else 0.0)) / GB,
          "temps": {k: per_device[k] for k in ("score_temp", "update_temp")},
          "params": n, "per_device_gb": {k: v / GB for k, v in per_device.items()},
          "phases_gb": {k: v / GB for k, v in phases.items()}, "peak_gb": peak / GB,
          "fits": fits, "largest_rollout_rows": largest}


def table(plans: list[dict]) -> str:
  pieces = ("policy_params", "optimizer", "reference", "simulator", "policy_cache",
            "simulator_cache", "score_temp", "update_temp")
  head = ["model", "sim", "GPUs", "logits chunk", "reference", "offload (host GB)", "settings",
          *pieces,
          "peak", *(f"fits {d}" for d in DEVICES_GB),
          *(f"max rows {d}" for d in DEVICES_GB)]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for p in plans:
    gb = p["per_device_gb"]
    cells = [p["model"], p["simulator"], str(p["gpus"]), str(p.get("logits_chunk", 0) or "-"),
             p.get("reference_dtype", "float32"),
             f"{p.get('offload', 'none')} ({p.get('host_gb', 0.0):.1f})",
             " ".join(f"{k}={v}" for k, v in p.get("settings", {}).items()) or "-",
             *(f"{gb[k]:.1f}" if k in gb else "-" for k in pieces), f"{p['peak_gb']:.1f}",
             *("yes" if p["fits"][d] else "no" for d in DEVICES_GB),
             *(str(p["largest_rollout_rows"][d]) for d in DEVICES_GB)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="qwen2.5-7b")
  parser.add_argument("--simulator", default="qwen2.5-14b", help="a shape, or none (served)")
  parser.add_argument("--gpus", type=int, default=8)
  parser.add_argument("--rows", type=int, default=0, help="rollout rows (0: the paper's 320)")
  parser.add_argument("--all", action="store_true",
                      help="qwen2.5-3b, qwen2.5-7b and llama3.2-3b on 1 and 8 GPUs")
  parser.add_argument("--logits_chunk", type=int, default=-1,
                      help="LM-head positions at a time (-1: the config's policy.logits_chunk, "
                           "0: all at once)")
  parser.add_argument("--compare_chunk", action="store_true",
                      help="also plan each case with logits_chunk=0 (the whole sequence)")
  parser.add_argument("--compare_options", action="store_true",
                      help="also plan each case with the memory options of OPTIONS (a float32 "
                           "reference, a bfloat16 one, bfloat16 with the reference and the "
                           "optimizer states offloaded to host memory)")
  parser.add_argument("--set", action="append", default=[],
                      help="FIELD=VALUE of configs/zerosearch.py (e.g. rl.micro_batch_size=4, "
                           "rollout.waves=2, rl.offload_optimizer=True), for every case")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  gpus = [1, 8] if args.all else [args.gpus]
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={max(gpus)}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  models = ("qwen2.5-3b", "qwen2.5-7b", "llama3.2-3b") if args.all else (args.model,)
  chunks = [args.logits_chunk] + ([0] if args.compare_chunk else [])
  overrides = dict(item.split("=", 1) for item in args.set)
  plans = []
  for chunk in chunks:
    for count in gpus:
      for model in models:
        base = plan_one(model, args.simulator, jax.devices()[:count], args.rows or None, chunk,
                        overrides=overrides)
        plans.append(base)
        if args.compare_options and chunk == chunks[0]:  # the compiled temporaries reused
          plans += [plan_one(model, args.simulator, jax.devices()[:count], args.rows or None,
                             chunk, name, base["temps"], overrides)
                    for name in OPTIONS if name != "config"]
  markdown = table(plans)
  print(markdown)
  if args.out:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_rl.md").write_text(markdown)
    (out / "plan_rl.json").write_text(json.dumps(plans, indent=2) + "\n")
  print(json.dumps([{k: p[k] for k in ("model", "gpus", "logits_chunk", "reference_dtype",
                                       "offload", "peak_gb", "fits")}
                    for p in plans]))
  return plans


if __name__ == "__main__":
  main()
