"""The ``model_check`` job: does a model load, decode consistently and export?

For a local HF checkpoint (``config.model_check.checkpoint``) or a random model
built from ``config.model``:
  1. export to ``WORKDIR/hf_export`` and read it back: the params must be equal;
  2. greedy-decode ``new_tokens`` tokens after right-padded prompts of different
     lengths with the KV cache (one prefill, then one token per step, each row at
     its own offset), timing the decode;
  3. recompute the same sequences with one full forward and compare the logits at
     every generated position.
Prints a table, writes ``WORKDIR/model_check.json`` and fails (exit 1) when the
cached and full logits differ by more than ``tolerance``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from zsjax import hf
from zsjax.model import ModelConfig, Transformer, count_params, init_cache, init_params
from zsjax.sharding import ShardingPlan, is_main_process


def greedy_decode(cfg: ModelConfig, params, prompts, prompt_lengths, new_tokens: int):
  """Greedy continuation with the cache.

  Args: ``prompts [B, P]`` right-padded, ``prompt_lengths [B]``.
  Returns ``tokens [B, T]`` and the logits that chose them ``[B, T, V]``.
  """
  b, p = prompts.shape
  model = Transformer(cfg)
  cache = init_cache(cfg, b, p + new_tokens)
  segment = (jnp.arange(p)[None, :] < prompt_lengths[:, None]).astype(jnp.int32)
  logits, cache = model.apply({"params": params}, prompts, segment_ids=segment, cache=cache)
  last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]

  def step(carry, _):
    cache, last = carry
    token = jnp.argmax(last, axis=-1).astype(jnp.int32)  # [B]
    out, cache = model.apply({"params": params}, token[:, None], cache=cache)
    return (cache, out[:, 0]), (token, last)

  _, (tokens, chosen_logits) = jax.lax.scan(step, (cache, last), None, length=new_tokens)
  return tokens.T, jnp.swapaxes(chosen_logits, 0, 1)


def full_forward_logits(cfg: ModelConfig, params, prompts, prompt_lengths, generated):
  """Logits ``[B, T, V]`` that predict each generated token, from one uncached forward."""
  b, p = prompts.shape
  t = generated.shape[1]
  rows = []
  for i in range(b):
    n = int(prompt_lengths[i])
    rows.append(np.concatenate([np.asarray(prompts[i, :n]), np.asarray(generated[i])]))
  width = max(len(r) for r in rows)
  tokens = np.zeros((b, width), np.int32)
  segment = np.zeros((b, width), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], segment[i, :len(r)] = r, 1
  logits = jax.jit(Transformer(cfg).apply)({"params": params}, jnp.asarray(tokens),
                                          segment_ids=jnp.asarray(segment))
  index = np.asarray(prompt_lengths)[:, None] - 1 + np.arange(t)[None, :]  # [B, T]
  return np.take_along_axis(np.asarray(logits), index[:, :, None], axis=1)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  check = config.model_check
  timings = {}

  plan = ShardingPlan.from_config(config)
  start = time.perf_counter()
  if check.checkpoint:
    cfg, params = hf.load_checkpoint(check.checkpoint, plan=plan)
    source = str(check.checkpoint)
  else:
    cfg = ModelConfig.from_dict(config.model.to_dict())
    params = jax.jit(init_params, static_argnums=0, out_shardings=plan.params(cfg))(
        cfg, jax.random.key(config.seed))
    source = "random init from config.model"
  timings["load_s"] = time.perf_counter() - start

  start = time.perf_counter()
  export_dir = hf.save_checkpoint(workdir / "hf_export", cfg, params)
  cfg_back, params_back = hf.load_checkpoint(export_dir, dtype=cfg.params_dtype)
  export_diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                    for a, b in zip(jax.tree_util.tree_leaves(params),
                                    jax.tree_util.tree_leaves(params_back)))
  timings["export_s"] = time.perf_counter() - start

  rng = np.random.default_rng(config.seed)
  b, p, t = check.batch_size, check.prompt_length, check.new_tokens
  prompts = rng.integers(0, cfg.vocab_size, (b, p)).astype(np.int32)
  prompt_lengths = rng.integers(max(1, p // 2), p + 1, (b,)).astype(np.int32)
  prompt_lengths[0] = p
  rows = plan.batch(prompts)

  def decode_fn(params, prompts, prompt_lengths):
    with plan.context():
      return greedy_decode(cfg, params, prompts, prompt_lengths, t)

  decode = jax.jit(decode_fn, in_shardings=(plan.params(cfg), rows, plan.batch(prompt_lengths)),
                   out_shardings=(rows, plan.batch(np.zeros((b, t, 1)))))
  start = time.perf_counter()
  jax.block_until_ready(decode(params, prompts, prompt_lengths))
  timings["decode_compile_s"] = time.perf_counter() - start
  start = time.perf_counter()
  generated, cached_logits = jax.block_until_ready(decode(params, prompts, prompt_lengths))
  timings["decode_s"] = time.perf_counter() - start
  full_logits = full_forward_logits(cfg, params, prompts, prompt_lengths, generated)
  decode_diff = float(np.abs(np.asarray(cached_logits) - full_logits).max())

  report = {
      "source": source, "arch": cfg.arch, "params": count_params(params),
      "sharding": plan.strategy, "mesh": str(plan.sizes),
      "layers": cfg.num_layers, "embed_dim": cfg.embed_dim,
      "export_max_abs_diff": export_diff, "export_config_equal": cfg_back == cfg,
      "decode_vs_full_max_abs_logit_diff": decode_diff, "tolerance": check.tolerance,
      "decode_tokens_per_s": b * t / timings["decode_s"],
      **{f"time/{k}": v for k, v in timings.items()},
  }
  report["ok"] = bool(decode_diff <= check.tolerance and export_diff == 0.0
                      and report["export_config_equal"])
  if not is_main_process():
    return report
  (workdir / "model_check.json").write_text(json.dumps(report, indent=2) + "\n")
  width = max(len(k) for k in report)
  print("\n".join(f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                  for k, v in report.items()))
  return report

