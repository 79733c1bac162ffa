"""Decode cost against the context cap: does a cached decode step pay for the
live prefix or for the whole cache?

  python experiments/bench_decode.py [--batch=32] [--live=300] [--steps=8] [--repeats=5]

A bare cached decode step (one token a row, ``model.cached_apply``) of an
8-layer, D 512, GQA 8/2 random model, every row holding ``--live`` tokens,
with a cache of 512 and of 4096 slots, each with attention over the live
prefix (cache views down to 512 slots, the rollout's default) and reading the
whole cache (``attention_view=0``, the behaviour before). Each configuration runs
in one jitted loop of ``--steps`` and of ``4 x --steps`` steps (best of
``--repeats`` timings each): the difference over the extra steps is the cost
of a decode step, and what remains is the per-call cost (copying the cache
argument into the loop; it grows with the cap and is paid once a call, as a
rollout zero-fills its cache once, not once a token). The
issue's target: the 4096 / 512 ratio at the same live length <= 1.3 with views.
Prints a table; the last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from zsjax import model as M

CFG = M.ModelConfig(vocab_size=8192, embed_dim=512, mlp_dim=1408, num_layers=8, num_heads=8,
                    num_kv_heads=2, head_dim=64, arch="qwen2", qkv_bias=True)


def loop_time(params, batch: int, cap: int, live: int, steps: int, repeats: int,
              views: tuple[int, ...]) -> float:
  """Seconds of one call running ``steps`` decode steps in a jitted loop, best of
  ``repeats``."""
  key = jax.random.key(1)
  shape = (CFG.num_layers, batch, cap, CFG.num_kv_heads, CFG.head_dim)
  dtype = CFG.compute_dtype
  cache = M.KVCache(k=(jax.random.normal(key, shape) * 0.1).astype(dtype),
                    v=(jax.random.normal(jax.random.fold_in(key, 1), shape) * 0.1).astype(dtype),
                    lengths=jnp.full((batch,), live, jnp.int32))
  model = M.Transformer(CFG)

  @jax.jit
  def run(params, cache, tokens):
    def body(_, carry):
      cache, tokens = carry
      logits, cache = M.cached_apply(model, params, tokens, cache, views=views)
      return cache, jnp.argmax(logits, -1).astype(jnp.int32)

    return jax.lax.fori_loop(0, steps, body, (cache, tokens))

  tokens = jnp.zeros((batch, 1), jnp.int32)
  jax.block_until_ready(run(params, cache, tokens))  # compile
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(params, cache, tokens))
    best = min(best, time.perf_counter() - start)
  return best


def step_time(params, batch: int, cap: int, live: int, steps: int, repeats: int,
              views: tuple[int, ...]) -> tuple[float, float]:
  """``(seconds per decode step, seconds per call)``: the slope and intercept of
  the call's time between ``steps`` and ``4 * steps`` steps. The per-call part
  is the copy of the (undonated) cache argument into the loop, which grows with
  the cap; a rollout pays its analogue (zero-filling its cache) once, not per
  token, so it is kept out of the per-step figure and reported beside it."""
  short = loop_time(params, batch, cap, live, steps, repeats, views)
  long = loop_time(params, batch, cap, live, 4 * steps, repeats, views)
  per_step = max(long - short, 0.0) / (3 * steps)
  return per_step, max(short - steps * per_step, 0.0)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--live", type=int, default=300)
  parser.add_argument("--steps", type=int, default=8, help="the short loop; the long has 4x")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--caps", default="512,4096")
  parser.add_argument("--dtype", default="float32",
                      help="compute and cache dtype (params stay float32 unless --param_dtype)")
  parser.add_argument("--param_dtype", default="float32")
  args = parser.parse_args(argv)
  global CFG
  CFG = M.ModelConfig.from_dict({**CFG.to_dict(), "dtype": args.dtype,
                                 "param_dtype": args.param_dtype})
  params = M.init_params(CFG, jax.random.key(0))
  caps = [int(c) for c in args.caps.split(",")]
  rows = {}
  for cap in caps:
    for name, views in (("live prefix", M.attention_views(cap, 512)), ("whole cache", (cap,))):
      rows[(cap, name)] = step_time(params, args.batch, cap, args.live, args.steps, args.repeats,
                                    views)
  print(f"decode step, batch {args.batch}, {args.live} live tokens a row, "
        f"{CFG.num_layers} layers, D {CFG.embed_dim}, GQA {CFG.num_heads}/{CFG.num_kv_heads}, "
        f"compute {CFG.dtype}, params {CFG.param_dtype}; {jax.devices()[0].platform}")
  print("| cache slots | attention reads | ms / step | ms / call (fixed) |")
  print("|---|---|---|---|")
  for (cap, name), (seconds, fixed) in rows.items():
    print(f"| {cap} | {name} | {1000 * seconds:.2f} | {1000 * fixed:.0f} |")
  small, large = caps[0], caps[-1]
  step = {key: value[0] for key, value in rows.items()}
  summary = {
      "live_prefix_ratio": step[(large, "live prefix")] / step[(small, "live prefix")],
      "whole_cache_ratio": step[(large, "whole cache")] / step[(small, "whole cache")],
      "caps": [small, large], "live": args.live, "batch": args.batch, "dtype": CFG.dtype,
      "param_dtype": CFG.param_dtype,
      "ms": {f"{cap}/{name}": round(1000 * s, 3) for (cap, name), s in step.items()},
      "fixed_ms": {f"{cap}/{name}": round(1000 * f, 1) for (cap, name), (_, f) in rows.items()}}
  print(f"cap {large} / cap {small} at the same live length: "
        f"{summary['live_prefix_ratio']:.2f}x over the live prefix, "
        f"{summary['whole_cache_ratio']:.2f}x reading the whole cache (target <= 1.3x)")
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
