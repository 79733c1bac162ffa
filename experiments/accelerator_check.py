"""Accelerator check: what one device gives the rollout and the train step.

  python experiments/accelerator_check.py --out=experiments/results/accelerator_<device>
  python experiments/accelerator_check.py --cpu            # reduced mode (the test suite)

Measures, on the first device, in one run:
  1. its copy bandwidth (read + write bytes of a large bf16 array per second) and
     its dense bf16 matmul peak (FLOP/s);
  2. decode tokens/s of the jitted rollout (``rollout.make_rollout``, the final
     turn only, sampling at temperature 1, no end tokens so every row decodes
     every step) at batch 64 and 256 for random Qwen2.5-0.5B- and 3B-shaped
     models in bf16, and its fraction of the bandwidth ceiling: the bytes a step
     must read (the weights plus the live KV cache) over the copy bandwidth,
     against the measured step time;
  3. the train step's MFU (``train_step.make_update_step``, bf16 compute, f32
     params) at the 0.5B shape against the matmul peak;
  4. the wall time of one whole RL step (``train_rl.train_step``: rollout against
     the on-device simulator, scoring, reference and update) at the 0.5B shape.
Targets on an H100/H200: decode >= 60% of the bandwidth ceiling at batch 256,
train-step MFU >= 45%. About 6 minutes on one H100; ``--cpu`` shrinks every
shape (a tiny model, batch 8) to run in under a minute on 2 cores. Writes
``OUT/accelerator_check.json`` and ``OUT/README.md``; the last line printed is a
JSON summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # big_tokenizer: an offline Qwen-like tokenizer
sys.path.insert(0, str(ROOT / "experiments"))

def _shapes() -> dict:
  """The model shapes: bench_sharding's published architectures, and a tiny one (--cpu)."""
  import bench_sharding

  return {**bench_sharding.MODELS,
          "tiny": dict(arch="qwen2", vocab_size=512, embed_dim=64, mlp_dim=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True,
                       tie_embeddings=True)}


SHAPES = _shapes()
FULL = dict(shapes=("qwen2.5-0.5b", "qwen2.5-3b"), batches=(64, 256), prompt=256, new=128,
            copy_mb=1024, matmul=8192, train=("qwen2.5-0.5b", 8, 2048), vocab=32000,
            rl=dict(prompts=16, samples=4, new=128, obs=256, length=1024, prompt=256))
CPU = dict(shapes=("tiny",), batches=(8,), prompt=16, new=8, copy_mb=32, matmul=512,
           train=("tiny", 4, 64), vocab=400,
           rl=dict(prompts=4, samples=2, new=8, obs=96, length=512, prompt=320))


def timed(fn, *args, repeats: int = 3) -> float:
  """Best wall seconds of ``fn(*args)`` after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def copy_bandwidth(megabytes: int) -> float:
  """Bytes per second read plus written by an elementwise pass over a bf16 array."""
  x = jnp.ones((megabytes * 2 ** 19,), jnp.bfloat16)
  seconds = timed(jax.jit(lambda a: a * 2), x)
  return 2 * x.nbytes / seconds


def matmul_peak(size: int) -> float:
  a = jnp.ones((size, size), jnp.bfloat16)
  b = jnp.full((size, size), 0.5, jnp.bfloat16)
  return 2.0 * size ** 3 / timed(jax.jit(jnp.matmul), a, b, repeats=5)


def model_config(shape: str, vocab: int, **fields):
  from zsjax.model import ModelConfig

  values = dict(SHAPES[shape], **fields)
  values["vocab_size"] = max(values["vocab_size"], vocab)
  return ModelConfig.from_dict(values)


def decode(shape: str, batch: int, setup: dict, tokenizer, bandwidth: float) -> dict:
  """Tokens/s of the jitted rollout's decode and its fraction of the ceiling."""
  from zsjax import rollout as R
  from zsjax.engine import NoEngine
  from zsjax import template
  from zsjax.model import count_params, init_params
  from zsjax.sampling import Sampling

  cfg = model_config(shape, len(tokenizer), dtype="bfloat16", param_dtype="bfloat16")
  params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
  static = R.prepare_static_tokens(tokenizer, vocab_size=cfg.vocab_size, eos_ids=())
  matcher = template.build_tag_matcher(tokenizer, vocab_size=cfg.vocab_size)
  prompt, new = setup["prompt"], setup["new"]
  config = R.RolloutConfig(max_turns=0, max_new_tokens=new, max_obs_tokens=64,
                           max_length=prompt + new, max_query_tokens=16)
  rollout = jax.jit(R.make_rollout(cfg, matcher, static, NoEngine(), config,
                                   Sampling(temperature=1.0)))
  ids = np.random.default_rng(0).integers(10, len(tokenizer) - 10, (batch, prompt))
  rb = R.RolloutBatch(prompt_tokens=jnp.asarray(ids, jnp.int32),
                      prompt_lengths=jnp.full((batch,), prompt, jnp.int32), engine_inputs=None)
  seconds = timed(rollout, params, None, rb, jax.random.key(1), jnp.int32(0))
  traj = rollout(params, None, rb, jax.random.key(1), jnp.int32(0))
  generated = int(np.asarray(traj.loss_mask).sum())
  prefill = timed(jax.jit(lambda p, b: R.initial_state(
      R.RolloutSpec(cfg, matcher, static, NoEngine(), config, Sampling()), p, b).last_logits),
                  params, rb)
  step = max(seconds - prefill, 1e-9) / new  # decode only
  weight_bytes = 2 * count_params(params)
  live = prompt + new / 2  # mean filled slots a row during the turn
  cache_bytes = 2 * 2 * cfg.num_layers * batch * live * cfg.num_kv_heads * cfg.head_dim
  ceiling = (weight_bytes + cache_bytes) / bandwidth
  return {"shape": shape, "batch": batch, "tokens": generated, "seconds": seconds,
          "prefill_s": prefill, "decode_step_ms": 1000 * step,
          "tokens_per_s": batch / step, "weight_gb": weight_bytes / 1e9,
          "live_cache_gb": cache_bytes / 1e9, "ceiling_step_ms": 1000 * ceiling,
          "bandwidth_fraction": ceiling / step}


def train_mfu(shape: str, batch: int, length: int, peak: float) -> dict:
  import bench_sharding

  args = bench_sharding.parse_args([f"--batch={batch}", f"--length={length}", "--dtype=bfloat16",
                                    "--strategies=dp", "--devices=0", "--steps=3", "--warmup=1"])
  cfg = dataclasses.replace(model_config(shape, 0), dtype="bfloat16", param_dtype="float32",
                            remat="dots" if shape != "tiny" else "none")
  row = bench_sharding.bench_one(args, cfg, "dp", jax.devices()[:1])
  row["mfu"] = row.get("model_tflop_s", float("nan")) * 1e12 / peak
  return {k: row.get(k) for k in ("batch", "length", "step_s", "tokens_per_s", "model_tflop_s",
                                  "mfu", "compile_s", "skipped") if k in row}


def rl_step(shape: str, setup: dict, tokenizer, work: Path) -> dict:
  """Wall seconds of one whole RL step (the second; the first compiles)."""
  from config_files import load_config
  from zsjax import data, rl_settings, train_rl

  tokenizer_dir = work / "tokenizer"
  tokenizer.save_pretrained(str(tokenizer_dir))
  rows = [{"question": f"Who founded company {i} in the old harbour town?",
           "golden_answers": [f"person {i}"]} for i in range(64)]
  train = data.write_jsonl(work / "train.jsonl", rows)
  config = load_config("zerosearch", "tiny")
  fields = dict(SHAPES[shape], dtype="bfloat16", param_dtype="float32",
                max_position_embeddings=32768)
  fields["vocab_size"] = max(fields["vocab_size"], len(tokenizer))
  for section in (config.policy, config.simulator):
    section.model = fields
    section.update(dict(dtype="bfloat16", param_dtype="float32"))
  r = setup["rl"]
  config.update(dict(progress=False, synthetic_data=False, tokenizer=str(tokenizer_dir)))
  config.data.train_files = str(train)
  config.rollout.update(dict(max_turns=2, max_new_tokens=r["new"], max_obs_tokens=r["obs"],
                             max_length=r["length"], max_prompt_tokens=r["prompt"]))
  config.simulator.update(dict(max_new_tokens=r["obs"] // 2, max_prefix_tokens=192))
  n = r["prompts"] * r["samples"]
  config.rl.update(dict(prompts_per_step=r["prompts"], samples_per_prompt=r["samples"],
                        minibatch_size=n, micro_batch_size=min(n, 16),
                        score_batch_size=min(n, 16), total_steps=2))
  config.mesh.update(dict(data=-1, fsdp=1, tensor=1))  # every device (one on a single GPU)
  config.sharding = "dp"
  rl_settings.check_config(config)
  job = train_rl.setup(config, work / "rl")
  state = job.programs.initial_state(job.initial_params, jax.random.key(3))
  start = time.perf_counter()
  state, _, _ = train_rl.train_step(job, state, 1)
  first = time.perf_counter() - start
  start = time.perf_counter()
  state, metrics, _ = train_rl.train_step(job, state, 2)
  second = time.perf_counter() - start
  return {"shape": shape, "trajectories": n, "first_step_s": first, "step_s": second,
          **{k: metrics[k] for k in ("time/rollout_s", "time/score_s", "time/update_s",
                                      "rollout/searches", "response/length") if k in metrics}}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="")
  parser.add_argument("--cpu", action="store_true", help="reduced shapes (any backend)")
  parser.add_argument("--skip", default="", help="comma list of parts to skip: "
                      "decode,train,rl")
  args = parser.parse_args(argv)
  import big_tokenizer

  from zsjax import environment

  setup = CPU if args.cpu else FULL
  skip = {s for s in args.skip.split(",") if s}
  device = jax.devices()[0]
  tokenizer = big_tokenizer.make(vocab_size=setup["vocab"])
  result = {"device": device.device_kind, "platform": device.platform, "mode":
            "cpu" if args.cpu else "full", "environment": environment.describe()}
  start = time.perf_counter()
  result["copy_gb_s"] = copy_bandwidth(setup["copy_mb"]) / 1e9
  result["matmul_tflop_s"] = matmul_peak(setup["matmul"]) / 1e12
  if "decode" not in skip:
    result["decode"] = [decode(shape, batch, setup, tokenizer, result["copy_gb_s"] * 1e9)
                        for shape in setup["shapes"] for batch in setup["batches"]]
  if "train" not in skip:
    shape, batch, length = setup["train"]
    result["train"] = {"shape": shape, **train_mfu(shape, batch, length,
                                                    result["matmul_tflop_s"] * 1e12)}
  if "rl" not in skip:
    with tempfile.TemporaryDirectory() as work:
      result["rl_step"] = rl_step(setup["train"][0], setup, tokenizer, Path(work))
  result["seconds"] = time.perf_counter() - start
  lines = [f"# Accelerator check: {result['device']} ({result['mode']} mode)", "",
           f"copy bandwidth {result['copy_gb_s']:.1f} GB/s, bf16 matmul peak "
           f"{result['matmul_tflop_s']:.1f} TFLOP/s (both measured in this run)", ""]
  if "decode" in result:
    lines += ["| model | batch | tokens/s | decode step ms | ceiling ms (weights + live cache) "
              "| fraction of ceiling |", "|---|---|---|---|---|---|"]
    lines += [f"| {d['shape']} | {d['batch']} | {d['tokens_per_s']:.0f} | "
              f"{d['decode_step_ms']:.2f} | {d['ceiling_step_ms']:.2f} | "
              f"{100 * d['bandwidth_fraction']:.0f}% |" for d in result["decode"]]
  if "train" in result:
    t = result["train"]
    lines += ["", f"train step ({t['shape']}, batch {t.get('batch')} x {t.get('length')}): "
              f"{t.get('step_s', float('nan')):.3f} s, MFU {100 * t.get('mfu', float('nan')):.0f}%"]
  if "rl_step" in result:
    r = result["rl_step"]
    lines += ["", f"whole RL step ({r['shape']}, {r['trajectories']} trajectories): "
              f"{r['step_s']:.2f} s (first, compiling: {r['first_step_s']:.1f} s)"]
  markdown = "\n".join(lines) + "\n"
  print(markdown)
  if args.out:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accelerator_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "README.md").write_text(markdown)
  summary = {"device": result["device"], "mode": result["mode"],
             "seconds": round(result["seconds"], 1),
             "decode_fraction_at_largest_batch": max(
                 (d["bandwidth_fraction"] for d in result.get("decode", [])
                  if d["batch"] == setup["batches"][-1]), default=None),
             "train_mfu": result.get("train", {}).get("mfu"),
             "rl_step_s": result.get("rl_step", {}).get("step_s")}
  print(json.dumps(summary))
  return result


if __name__ == "__main__":
  main()
