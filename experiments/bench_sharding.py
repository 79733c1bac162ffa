"""Benchmark sharding strategies on one training update (masked next-token loss,
AdamW), the same jitted ``update(state, batch, rng)`` the trainers use.

For each strategy (dp, fsdp, tp, fsdp_tp) on a mesh that fits the devices it
measures: compile time; step time (median over timed steps after warm-up);
tokens/s; achieved model FLOP/s and its fraction of a dense-matmul peak measured
in the same run on the same devices (MFU); per-device memory from the compiled
executable's memory analysis, the bytes of params each device holds, and the
backend's device memory stats where it has them (GPU/TPU). Writes
``results.csv``, ``results.md`` and ``results.png`` to ``--out``, prints the
table, and prints as its last line one JSON object mapping each strategy to its
step time, tokens/s and per-device bytes.

``--plan`` only lowers and compiles the step from abstract inputs (nothing is
allocated) and reports per-device memory and FLOPs for a model and mesh, e.g. to
pick a strategy for Qwen2.5-7B on 8 accelerators before renting them:

  python experiments/bench_sharding.py --plan --model=qwen2.5-7b --devices=8 \
      --strategies=fsdp,fsdp_tp --batch=16 --length=2048 --dtype=bfloat16

Memory figures from a CPU compile approximate an accelerator's (fusion differs).

Examples:
  # the committed table: 8 fake CPU devices
  python experiments/bench_sharding.py --devices=8 --model=small --out=experiments/results/sharding_cpu8
  # MFU on one CPU device with a ~0.1B model (target >= 50%)
  python experiments/bench_sharding.py --devices=1 --model=100m --strategies=dp --batch=8 --length=256
  # a GPU/TPU host: leave out --devices to use the real devices
  python experiments/bench_sharding.py --model=100m --dtype=bfloat16 --batch=64 --length=1024
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

MODELS = {
    # name: ModelConfig fields (the real ones are the published architectures)
    "tiny": dict(vocab_size=256, embed_dim=64, mlp_dim=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16),
    "small": dict(vocab_size=4096, embed_dim=256, mlp_dim=768, num_layers=4, num_heads=8,
                  num_kv_heads=4, head_dim=32),
    "100m": dict(vocab_size=8192, embed_dim=768, mlp_dim=2048, num_layers=12, num_heads=12,
                 num_kv_heads=4, head_dim=64),
    "qwen2.5-0.5b": dict(arch="qwen2", vocab_size=151936, embed_dim=896, mlp_dim=4864,
                         num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                         qkv_bias=True, tie_embeddings=True, rope_theta=1e6),
    "qwen2.5-3b": dict(arch="qwen2", vocab_size=151936, embed_dim=2048, mlp_dim=11008,
                       num_layers=36, num_heads=16, num_kv_heads=2, head_dim=128,
                       qkv_bias=True, tie_embeddings=True, rope_theta=1e6),
    "qwen2.5-7b": dict(arch="qwen2", vocab_size=152064, embed_dim=3584, mlp_dim=18944,
                       num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                       qkv_bias=True, tie_embeddings=False, rope_theta=1e6),
    "qwen2.5-14b": dict(arch="qwen2", vocab_size=152064, embed_dim=5120, mlp_dim=13824,
                        num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128,
                        qkv_bias=True, tie_embeddings=False, rope_theta=1e6),
    "llama3.2-3b": dict(arch="llama", vocab_size=128256, embed_dim=3072, mlp_dim=8192,
                        num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
                        tie_embeddings=True, rope_theta=500000.0,
                        rope_scaling=dict(kind="llama3", factor=32.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
}
STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--devices", type=int, default=0,
                 help="fake CPU devices to simulate (0 = use the real devices)")
  p.add_argument("--model", default="small", help=f"one of {sorted(MODELS)}")
  p.add_argument("--hf_config", default="", help="an HF config.json (overrides --model)")
  p.add_argument("--strategies", default=",".join(STRATEGIES))
  p.add_argument("--tensor", type=int, default=2, help="tensor-parallel size for tp and fsdp_tp")
  p.add_argument("--mesh", default="", help="e.g. data=2,fsdp=2,tensor=2 for every strategy")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
  p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--peak_size", type=int, default=2048, help="matmul size for the peak")
  p.add_argument("--plan", action="store_true", help="compile only; nothing is allocated")
  p.add_argument("--out", default="", help="output folder (default: none written)")
  return p.parse_args(argv)


def mesh_for(strategy: str, devices: int, tensor: int, override: str) -> dict[str, int]:
  if override:
    return {k: int(v) for k, v in (item.split("=") for item in override.split(","))}
  if strategy == "dp":
    return {"data": devices}
  if strategy == "fsdp":
    return {"fsdp": devices}
  tensor = min(tensor, devices)
  rest = devices // tensor
  return {"data": rest, "tensor": tensor} if strategy == "tp" else {"fsdp": rest, "tensor": tensor}


def mesh_name(sizes: dict[str, int]) -> str:
  return "x".join(f"{k[0]}{v}" for k, v in sizes.items() if v > 1) or "1"


def model_config(args):
  from zsjax import hf
  from zsjax.model import ModelConfig

  if args.hf_config:
    cfg = hf.config_from_hf(json.loads(Path(args.hf_config).read_text()), source=args.hf_config)
  else:
    if args.model not in MODELS:
      sys.exit(f"--model={args.model!r} is not one of {sorted(MODELS)}")
    cfg = ModelConfig.from_dict(MODELS[args.model])
  return dataclasses.replace(cfg, dtype=args.dtype, param_dtype="float32", remat=args.remat)


def matmul_peak(devices, size: int, dtype, steps: int) -> float:
  """FLOP/s of one dense matmul per device, all devices at once (the aggregate peak
  the sharded step could reach on these devices)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  mesh = Mesh(np.array(devices), ("d",))
  sharding = NamedSharding(mesh, P("d"))
  shape = (len(devices), size, size)
  a = jax.device_put(jnp.ones(shape, dtype), sharding)
  b = jax.device_put(jnp.full(shape, 0.5, dtype), sharding)
  f = jax.jit(lambda x, y: jnp.einsum("dij,djk->dik", x, y), out_shardings=sharding)
  jax.block_until_ready(f(a, b))
  times = []
  for _ in range(max(steps, 10)):
    start = time.perf_counter()
    jax.block_until_ready(f(a, b))
    times.append(time.perf_counter() - start)
  return 2.0 * len(devices) * size ** 3 / min(times)


def _cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def _memory(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  out = {k: int(getattr(stats, f"{k}_size_in_bytes", 0))
         for k in ("argument", "output", "temp", "alias", "generated_code")}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def bench_one(args, cfg, strategy: str, devices) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from zsjax import sharding as S
  from zsjax import train_step as T
  from zsjax.model import count_params, model_flops_per_token, param_shapes

  sizes = mesh_for(strategy, len(devices), args.tensor, args.mesh)
  row = {"strategy": strategy, "mesh": mesh_name(sizes), "devices": len(devices),
         "batch": args.batch, "length": args.length}
  try:
    plan = S.ShardingPlan(S.make_mesh(sizes, devices), S.rules_for(strategy), strategy)
    tx, _ = T.make_optimizer(1e-4, 1000)
    shardings = T.state_shardings(cfg, tx, plan)
    batch_shape = {"tokens": jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32),
                   "loss_mask": jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32)}
    batch_shardings = plan.batch(batch_shape)
  except S.ShardingError as e:
    return {**row, "skipped": str(e)}

  abstract_state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(functools.partial(T.init_state, cfg, tx), jax.random.key(0)), shardings)
  abstract_batch = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch_shape, batch_shardings)
  abstract_rng = jax.eval_shape(lambda: jax.random.key(0))
  update = T.make_update_step(functools.partial(T.next_token_loss, cfg), tx, plan, shardings,
                              batch_shardings)
  start = time.perf_counter()
  compiled = update.lower(abstract_state, abstract_batch, abstract_rng).compile()
  row["compile_s"] = time.perf_counter() - start

  n_params = count_params(param_shapes(cfg))
  tokens = args.batch * args.length
  model_flops = model_flops_per_token(cfg, args.length) * tokens
  memory = _memory(compiled)
  row.update(params=n_params, model_gflop_per_step=model_flops / 1e9,
             model_gflop_per_device=model_flops / len(devices) / 1e9,
             xla_gflop_per_device=_cost_flops(compiled) / 1e9,
             bytes_per_device=memory.get("total", -1), temp_bytes=memory.get("temp", -1),
             argument_bytes=memory.get("argument", -1))
  if args.plan:
    return row

  state, _ = T.create_train_state(cfg, tx, plan, rng=jax.random.key(0))
  row["param_bytes_per_device"] = max(S.bytes_per_device(state.params).values())
  rng = np.random.default_rng(0)
  batch = plan.put_batch({
      "tokens": rng.integers(0, cfg.vocab_size, (args.batch, args.length)).astype(np.int32),
      "loss_mask": np.ones((args.batch, args.length), np.int32)})
  key = jax.random.key(1)
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch, key)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, key)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  step = statistics.median(times)
  row.update(step_s=step, step_s_min=min(times), step_s_max=max(times), tokens_per_s=tokens / step,
             model_tflop_s=model_flops / step / 1e12,
             loss=float(np.asarray(metrics["loss/total"])))
  peaks = [d.memory_stats().get("peak_bytes_in_use", 0) for d in devices
           if d.memory_stats() is not None] if hasattr(devices[0], "memory_stats") else []
  row["device_peak_bytes"] = max(peaks) if peaks else None
  return row


COLUMNS = ("strategy", "mesh", "devices", "compile_s", "step_s", "tokens_per_s", "model_tflop_s",
           "mfu", "model_gflop_per_device", "xla_gflop_per_device", "bytes_per_device",
           "param_bytes_per_device", "temp_bytes", "device_peak_bytes", "loss", "skipped")
NOTES = ("model_gflop_per_device: model FLOPs of the step (matmuls incl. attention, fwd+bwd) / "
         "devices. xla_gflop_per_device: XLA's cost analysis of the compiled program, which counts "
         "the layer scan's body once, so it undercounts deep models. bytes_per_device: arguments "
         "+ outputs + temporaries - aliased (donated) bytes from the compiled memory analysis. "
         "mfu: model FLOP/s over the dense-matmul peak measured on the same devices in the same run.")


def _fmt(value) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def markdown_table(rows, columns=COLUMNS) -> str:
  """A markdown table of ``rows`` (dicts) over the ``columns`` any row has."""
  cols = [c for c in columns if any(c in r for r in rows)]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
  return "\n".join(lines)


def write_outputs(out: Path, rows, header: str):
  out.mkdir(parents=True, exist_ok=True)
  keys = sorted({k for r in rows for k in r})
  with open(out / "results.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
  (out / "results.md").write_text(f"{header}\n\n{markdown_table(rows)}\n\n{NOTES}\n")
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  done = [r for r in rows if "skipped" not in r]
  labels = [f"{r['strategy']}\n{r['mesh']}" for r in done]
  panels = [("step_s", "step time (s)"), ("bytes_per_device", "compiled bytes / device"),
            ("mfu", "MFU (vs measured matmul peak)")]
  panels = [p for p in panels if all(p[0] in r for r in done)]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
  for ax, (key, title) in zip(axes if len(panels) > 1 else [axes], panels):
    ax.bar(labels, [r[key] for r in done], color="#4c72b0")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
  fig.suptitle(header.splitlines()[0].lstrip("# "), fontsize=9)
  fig.tight_layout()
  fig.savefig(out / "results.png", dpi=120)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  if args.devices:
    os.environ["JAX_PLATFORMS"] = os.environ.get("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
  import jax
  import jax.numpy as jnp

  devices = jax.devices()
  if args.devices and len(devices) != args.devices:
    sys.exit(f"--devices={args.devices} but JAX sees {len(devices)}: set it before JAX starts "
             "(run this script in a fresh process).")
  cfg = model_config(args)
  strategies = [s for s in args.strategies.split(",") if s]
  # The peak is measured before and after the strategies and the higher kept, so a
  # noisy (low) peak cannot inflate MFU.
  measure = functools.partial(matmul_peak, devices, args.peak_size, jnp.dtype(args.dtype),
                              args.steps)
  peak = None if args.plan else measure()
  rows = [bench_one(args, cfg, s, devices) for s in strategies]
  if not args.plan:
    peak = max(peak, measure())
    for r in rows:
      if "step_s" in r:
        r["mfu"] = r["model_tflop_s"] * 1e12 / peak
  header = (f"# bench_sharding: {args.hf_config or args.model}, {len(devices)} x "
            f"{devices[0].platform} ({devices[0].device_kind}), batch {args.batch} x length "
            f"{args.length}, dtype {args.dtype}, remat {args.remat}"
            + (", plan only" if args.plan else
               f"\nmatmul peak {peak / 1e9:.1f} GFLOP/s (all devices, {args.peak_size}^3 "
               f"{args.dtype}, best of >= 10 runs before and after)"
               f"\nstep time = median of {args.steps} after {args.warmup} warm-up")
            + "\ncommand: python experiments/bench_sharding.py " + " ".join(sys.argv[1:]))
  print(header)
  print(markdown_table(rows))
  print(NOTES)
  if args.out:
    write_outputs(Path(args.out), rows, header)
  summary = {}
  for r in rows:
    key = r["strategy"] if args.mesh or sum(x["strategy"] == r["strategy"] for x in rows) == 1 \
        else f"{r['strategy']}@{r['mesh']}"
    summary[key] = ({"skipped": r["skipped"]} if "skipped" in r else
                    {"step_s": r.get("step_s"), "tokens_per_s": r.get("tokens_per_s"),
                     "bytes_per_device": r["bytes_per_device"],
                     "model_gflop_per_device": r["model_gflop_per_device"],
                     **({"mfu": r["mfu"]} if "mfu" in r else {})})
  print(json.dumps(summary))
  return rows


if __name__ == "__main__":
  main()
