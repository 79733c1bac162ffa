"""Accelerator check: one paper-shaped RL step, and what one device gives the
rollout and the train step.

  python experiments/accelerator_check.py --out=experiments/results/accelerator_<device>
  python experiments/accelerator_check.py --cpu            # reduced mode (the test suite)

Measures, on the first device, in one run (each part saved as it ends, so a run
stopped by a time limit keeps what it measured):
  0. its copy bandwidth (read + write bytes of a large bf16 array per second) and
     its dense bf16 matmul peak (FLOP/s);
  1. one whole RL step of ``configs/zerosearch.py:qwen2.5-3b`` (64 prompts x 5
     samples, 4096-token context, packed scoring and update, bf16 reference) with
     random weights and a co-resident simulator, under the memory settings of the
     first committed plan (``PAPER_PLANS``, experiments/results/plan_rl/) that fits
     the device: the 14B simulator and both offloads on a 141 GB H200. The random
     policy's actions are scripted (3 searches in turns of 250 tokens, then an
     answer; the simulator writes its 600 tokens a search), and the step is split
     into policy decode, simulator decode, scoring, update and the compile time of
     the first call (``time/*_compile_s``), beside the device's peak memory and
     the plan's. The goal it measures: a step <= 90 s on one H200;
  2. decode tokens/s of the jitted rollout (``rollout.make_rollout``, the final
     turn only, sampling at temperature 1, no end tokens so every row decodes
     every step) at batch 64 and 256 for random Qwen2.5-0.5B- and 3B-shaped
     models in bf16, and its fraction of the bandwidth ceiling: the bytes a step
     must read (the weights plus the live KV cache) over the copy bandwidth,
     against the measured step time;
  3. the train step's MFU (``train_step.make_update_step``, bf16 compute, f32
     params) at the 0.5B shape against the matmul peak.
Targets on an H100/H200: decode >= 60% of the bandwidth ceiling at batch 256,
train-step MFU >= 45%. Run it on an H200 (device kind ``nvidia-h200``): no
committed plan fits the 3B step on an 80 GB H100, where part 1 stops with the
plan to make (``--skip=paper`` runs the rest). ``--cpu`` shrinks every shape (a
tiny model, 16 trajectories) to run in about a minute on 2 cores. Writes
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
            paper=dict(policy="qwen2.5-3b", searches=3, turn_tokens=250))
CPU = dict(shapes=("tiny",), batches=(8,), prompt=16, new=8, copy_mb=32, matmul=512,
           train=("tiny", 4, 64), vocab=400,
           paper=dict(policy="tiny", searches=2, turn_tokens=24))


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


# The paper's RL step on one device (issue 29 item 8): configs/zerosearch.py:qwen2.5-3b
# (64 prompts x 5 samples, 4096-token context, packed scoring and update, a bfloat16
# reference) with random weights and a co-resident simulator, under the memory settings
# of a committed plan (experiments/results/plan_rl/<name>/plan_rl.json, its simulator,
# planned peak and settings read from there): the first whose planned peak fits 90% of
# the device's memory. An 80 GB H100 holds no 3B step in the committed plans: their
# update phase alone (params, AdamW states and the update's temporaries) is over its
# 72 GB budget.
PAPER_PLANS = ("one_h200_3b",)
# --cpu: the same program at a tiny model, a small batch and short turns.
CPU_PLAN = ("cpu", "tiny", 0.0,
            {"rl.prompts_per_step": "8", "rl.samples_per_prompt": "2", "rollout.waves": "2",
             "rl.minibatch_size": "16", "rl.micro_batch_size": "8", "rl.score_batch_size": "8",
             "rl.pack_tokens": "1024", "rollout.max_length": "1024",
             "rollout.max_prompt_tokens": "512", "rollout.max_new_tokens": "32",
             "rollout.max_obs_tokens": "160", "simulator.max_new_tokens": "24",
             "simulator.max_prefix_tokens": "640", "mesh.data": "-1", "mesh.fsdp": "1"})


def _load_plans() -> tuple:
  """``(name, simulator shape, planned peak GB, settings)`` of each of PAPER_PLANS."""
  plans = []
  for name in PAPER_PLANS:
    committed = json.loads((ROOT / "experiments" / "results" / "plan_rl" / name /
                            "plan_rl.json").read_text())[0]
    plans.append((name, committed["simulator"], committed["peak_gb"],
                  {k: str(v) for k, v in committed["settings"].items()}))
  return tuple(plans)


def pick_plan(device_gb: float, cpu: bool) -> tuple:
  if cpu:
    return CPU_PLAN
  for plan in _load_plans():
    if plan[2] <= 0.9 * device_gb:
      return plan
  raise ValueError(f"no committed plan fits {device_gb:.0f} GB; plan one with "
                   "experiments/plan_rl.py --model=qwen2.5-3b --gpus=1 --simulator=... --set ... "
                   "and add it to PAPER_PLANS")


def device_gb(device) -> float:
  stats = device.memory_stats() or {}
  return stats.get("bytes_limit", 0) / 1e9


def paper_step(setup: dict, work: Path, cpu: bool) -> dict:
  """One paper-shaped RL step, timed by phase with the compile time taken out:
  policy decode, simulator decode, scoring (old and reference log-probs) and update.

  The random policy's actions are scripted (bench_rollout's ``ScriptedDraws``): each
  turn is ``turn_tokens`` word tokens ending in ``<search> ... </search>``, the last in
  ``<answer> ... </answer>``; the random simulator writes its whole budget
  (``simulator.max_new_tokens``) of word tokens per search. The simulator's share of the
  rollout is measured by timing its generation alone for a wave's rows (the same
  program the rollout calls once per search turn); the policy's is the rest."""
  import bench_rollout
  import big_tokenizer
  from config_files import load_config
  from plan_rl import apply_overrides
  from zsjax import data, train_rl

  device = jax.devices()[0]
  name, simulator, planned_peak, settings = pick_plan(device_gb(device), cpu)
  p = setup["paper"]
  tokenizer = big_tokenizer.make(vocab_size=setup["vocab"])
  tokenizer_dir = work / "tokenizer"
  tokenizer.save_pretrained(str(tokenizer_dir))
  rows = [{"question": f"Who founded the company {i} in the old harbour town of Orlam?",
           "golden_answers": [bench_rollout.ANSWER]} for i in range(64)]
  config = load_config("zerosearch", "qwen2.5-3b")
  apply_overrides(config, settings)
  config.update(dict(progress=False, synthetic_data=False, tokenizer=str(tokenizer_dir)))
  config.data.train_files = str(data.write_jsonl(work / "train.jsonl", rows))
  for section, shape in ((config.policy, p["policy"]), (config.simulator, simulator)):
    fields = dict(SHAPES[shape], max_position_embeddings=32768)
    fields["vocab_size"] = max(fields["vocab_size"], len(tokenizer))
    section.model = fields
  vocab = config.policy.model.vocab_size
  allowed = bench_rollout.word_tokens(tokenizer, vocab)
  searches, turn = p["searches"], p["turn_tokens"]
  policy_draws = bench_rollout.ScriptedDraws(
      allowed, bench_rollout.action_script(tokenizer, searches + 1, turn))
  sim_draws = bench_rollout.ScriptedDraws(allowed, np.full(1, -1, np.int32))
  job = train_rl.setup(config, work / "rl", draws=(policy_draws, sim_draws))
  state = job.programs.placed_optimizer(
      job.programs.initial_state(job.initial_params, jax.random.key(3)), host=True)
  state, metrics, (traj, _, _) = train_rl.train_step(job, state, 1)
  run = {phase: metrics[f"time/{phase}_s"] - metrics[f"time/{phase}_compile_s"]
         for phase in ("rollout", "score", "update")}
  # the simulator alone: one search turn of a wave's rows, compiled, then timed
  waves, r = config.rollout.waves, job.settings
  batch, _, _ = train_rl.rollout_batch(job, 1, 0, waves)
  n = batch.prompt_tokens.shape[0]
  query = tokenizer.encode(" Orlam founder ", add_special_tokens=False)
  width = job.rollout_config.max_query_tokens
  query_tokens = jnp.asarray(np.tile(np.pad(query, (0, width - len(query)),
                                            constant_values=job.pad_id), (n, 1)), jnp.int32)
  plan = job.plan  # laid out as the rollout lays them out (rows over data x fsdp)
  args = (job.engine_state, jax.device_put(batch.engine_inputs, job.engine.input_shardings(plan)),
          jax.device_put(query_tokens, plan.rows(2)),
          *jax.device_put((jnp.full((n,), len(query), jnp.int32), jnp.ones((n,), bool),
                           jnp.arange(n) % 2 == 1), plan.rows(1)), jax.random.key(4))
  generate = jax.jit(lambda *a: job.engine(*a)).lower(*args).compile()
  jax.block_until_ready(generate(*args))  # a first run (host callbacks warm)
  begin = time.perf_counter()
  jax.block_until_ready(generate(*args))
  simulator_turn = time.perf_counter() - begin
  simulator_s = simulator_turn * searches * waves
  step_s = sum(run.values()) + metrics["time/reward_s"]
  peak = (device.memory_stats() or {}).get("peak_bytes_in_use", 0) / 1e9
  return {
      "plan": name, "policy": p["policy"], "simulator": simulator,
      "settings": settings, "trajectories": len(traj.lengths), "waves": waves,
      "searches_per_row": metrics["rollout/searches"],
      "response_length": metrics["response/length"],
      "policy_tokens_per_row": metrics["response/policy_tokens"],
      "step_s": step_s, "first_step_wall_s": metrics["time/step_s"],
      "compile_s": sum(metrics[f"time/{k}_compile_s"] for k in ("rollout", "score", "update")),
      "policy_decode_s": max(run["rollout"] - simulator_s, 0.0),
      "simulator_decode_s": simulator_s, "simulator_turn_s": simulator_turn,
      "rollout_s": run["rollout"], "scoring_s": run["score"], "update_s": run["update"],
      "reward_s": metrics["time/reward_s"], "device_gb": device_gb(device),
      "peak_gb": peak, "planned_peak_gb": planned_peak,
      "truncated": metrics["rollout/truncated"], "rows_per_wave": n,
      "samples_per_prompt": r.samples_per_prompt}


def report(result: dict) -> str:
  lines = [f"# Accelerator check: {result['device']} ({result['mode']} mode)", "",
           f"copy bandwidth {result['copy_gb_s']:.1f} GB/s, bf16 matmul peak "
           f"{result['matmul_tflop_s']:.1f} TFLOP/s (both measured in this run)", ""]
  if "paper_step" in result:
    r = result["paper_step"]
    lines += [f"## One paper-shaped RL step ({r['policy']} policy, {r['simulator']} simulator "
              f"on the same device, plan {r['plan']})", "",
              f"{r['trajectories']} trajectories in {r['waves']} wave(s), "
              f"{r['searches_per_row']:.1f} searches and {r['response_length']:.0f} response "
              f"tokens a row; settings: "
              + (" ".join(f"{k}={v}" for k, v in r["settings"].items()) or "the config's"), "",
              "| phase | seconds |", "|---|---|"]
    lines += [f"| {label} | {r[key]:.1f} |" for label, key in (
        ("policy decode (rollout minus simulator)", "policy_decode_s"),
        ("simulator decode", "simulator_decode_s"), ("scoring (old + reference log-probs)",
                                                     "scoring_s"),
        ("update", "update_s"), ("rewards (host)", "reward_s"), ("**step**", "step_s"),
        ("compile (first call, not in the step)", "compile_s"))]
    lines += ["", f"device memory: peak {r['peak_gb']:.1f} GB of {r['device_gb']:.1f} GB "
              f"(the plan: {r['planned_peak_gb']:.1f} GB); the goal: a step <= 90 s on one H200", ""]
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
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="")
  parser.add_argument("--cpu", action="store_true", help="reduced shapes (any backend)")
  parser.add_argument("--skip", default="", help="comma list of parts to skip: "
                      "paper,decode,train")
  args = parser.parse_args(argv)
  import big_tokenizer

  from zsjax import environment

  setup = CPU if args.cpu else FULL
  skip = {s for s in args.skip.split(",") if s}
  device = jax.devices()[0]
  result = {"device": device.device_kind, "platform": device.platform, "mode":
            "cpu" if args.cpu else "full", "environment": environment.describe()}
  start = time.perf_counter()
  out = Path(args.out) if args.out else None

  def save():  # after every part: a run stopped by a time limit keeps what it measured
    result["seconds"] = time.perf_counter() - start
    if out:
      out.mkdir(parents=True, exist_ok=True)
      (out / "accelerator_check.json").write_text(json.dumps(result, indent=2) + "\n")
      (out / "README.md").write_text(report(result))

  result["copy_gb_s"] = copy_bandwidth(setup["copy_mb"]) / 1e9
  result["matmul_tflop_s"] = matmul_peak(setup["matmul"]) / 1e12
  save()
  if "paper" not in skip:  # first: what the device is lent for
    with tempfile.TemporaryDirectory() as work:
      try:
        result["paper_step"] = paper_step(setup, Path(work), args.cpu)
      except ValueError as e:  # no plan fits this device: the other parts still run
        if "no committed plan fits" not in str(e):
          raise
        result["paper_step_skipped"] = str(e)
        print(f"paper step skipped: {e}", file=sys.stderr)
    save()
  tokenizer = big_tokenizer.make(vocab_size=setup["vocab"])
  if "decode" not in skip:
    result["decode"] = [decode(shape, batch, setup, tokenizer, result["copy_gb_s"] * 1e9)
                        for shape in setup["shapes"] for batch in setup["batches"]]
    save()
  if "train" not in skip:
    shape, batch, length = setup["train"]
    result["train"] = {"shape": shape, **train_mfu(shape, batch, length,
                                                    result["matmul_tflop_s"] * 1e12)}
  save()
  print(report(result))
  paper = result.get("paper_step", {})
  summary = {"device": result["device"], "mode": result["mode"],
             "seconds": round(result["seconds"], 1),
             "paper_step_s": paper.get("step_s"), "paper_plan": paper.get("plan"),
             "paper_peak_gb": paper.get("peak_gb"),
             "decode_fraction_at_largest_batch": max(
                 (d["bandwidth_fraction"] for d in result.get("decode", [])
                  if d["batch"] == setup["batches"][-1]), default=None),
             "train_mfu": result.get("train", {}).get("mfu")}
  print(json.dumps(summary))
  return result


if __name__ == "__main__":
  main()
