"""Padding-free scoring and update (``rl.pack_tokens``) against padded rows, on one
device, in one run.

For each length distribution, one RL step's batch of ``--rows`` trajectories
(lengths drawn from it, random tokens, random rewards) is scored (the reference
and the old policy: ``rl_step.make_rl_batch``) and updated on (one epoch in two
minibatches: ``rl_step.update_epochs``) twice, by the same programs but for
``rl.pack_tokens``: 0 (every row padded to the context cap) and the cap (the
trajectories packed into rows of it, ``zsjax.packing``). Both runs see the same
batch; each time is the median of ``--repeats`` after a compile run.

  tiny:   the tiny world's RL trajectories (``configs/tiny_world.py:v2``: a 384-token
          cap, prompts of ~60 tokens, responses of ~110 +- 40, from
          ``experiments/results/tiny_world_v2``), its 96-wide 2-layer policy;
  paper:  300 to 4096 tokens, uniform (the paper's 4096 cap; search-RL
          trajectories span that range), a 128-wide 2-layer model.

Prints a table (seconds, padded / packed, the packing's fill) and as its last
line a JSON object with every figure and the environment. Timings are of this
machine and move with its load: compare the ratios, measured in one run.

  python experiments/bench_packing.py --out=experiments/results/packing_cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

DISTRIBUTIONS = {
    # cap, model shape, lengths(rng, rows)
    "tiny": (384, dict(vocab_size=1536, embed_dim=96, mlp_dim=256, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=24, arch="qwen2", qkv_bias=True,
                       tie_embeddings=True),
             lambda rng, n: (60 + rng.normal(110, 40, n)).clip(70, 384).astype(int)),
    "paper": (4096, dict(vocab_size=4096, embed_dim=128, mlp_dim=256, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=32, arch="qwen2",
                         qkv_bias=True, tie_embeddings=True),
              lambda rng, n: rng.integers(300, 4097, n)),
}


def run_case(name: str, rows: int, repeats: int, seed: int) -> dict:
  import jax
  import numpy as np

  from config_files import load_config
  from zsjax import model as M
  from zsjax import packing, rl_settings, rl_step
  from zsjax import sharding as S

  cap, shape, draw = DISTRIBUTIONS[name]
  cfg = M.ModelConfig(**shape)
  rng = np.random.default_rng(seed)
  lengths = draw(rng, rows)
  held = np.arange(cap)[None] < lengths[:, None]
  traj = types.SimpleNamespace(
      tokens=np.where(held, rng.integers(0, cfg.vocab_size, (rows, cap)), 0).astype(np.int32),
      loss_mask=(held & (np.arange(cap)[None] >= 60)).astype(np.int32), lengths=lengths,
      prompt_lengths=np.full(rows, 60))
  rewards = rng.random(rows).astype(np.float32)
  plan = S.ShardingPlan(S.make_mesh({"data": 1}, jax.devices()[:1]), S.rules_for("dp"), "dp")
  params = M.init_params(cfg, jax.random.key(0))
  out = {"rows": rows, "cap": cap, "mean_length": float(lengths.mean()),
         "fill_padded": float(lengths.sum()) / (rows * cap)}
  for pack in (0, cap):
    section = load_config("zerosearch", "tiny,grpo").rl
    section.update(prompts_per_step=rows // 4, samples_per_prompt=4, minibatch_size=rows // 2,
                   micro_batch_size=2, score_batch_size=2, pack_tokens=pack)
    r = rl_settings.RLSettings.from_config(section).check()
    programs = rl_step.build_programs(r, cfg, plan, 1.0)
    ref = programs.reference_params(params)
    state = programs.initial_state(params, jax.random.key(1))
    times = {"score": [], "update": []}
    for i in range(repeats + 1):  # the first run compiles
      t = time.perf_counter()
      batch = rl_step.make_rl_batch(programs, state, ref, traj, rewards)
      jax.block_until_ready(batch.advantages)
      score = time.perf_counter() - t
      t = time.perf_counter()
      new, metrics = rl_step.update_epochs(programs, state, batch, np.random.default_rng(i),
                                           jax.random.key(2))
      jax.block_until_ready(new.policy.params)
      update = time.perf_counter() - t
      state = new
      if i:
        times["score"].append(score)
        times["update"].append(update)
    key = "packed" if pack else "padded"
    out[key] = {k: statistics.median(v) for k, v in times.items()}
    if pack:
      out["fill_packed"] = packing.pack(lengths, cap, multiple=2).fill
  out["speedup"] = {k: out["padded"][k] / out["packed"][k] for k in ("score", "update")}
  return out


def table(results: dict) -> str:
  lines = ["| lengths | rows x cap | fill padded / packed | score s padded / packed | ratio | "
           "update s padded / packed | ratio |", "|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    lines.append(
        f"| {name} | {r['rows']} x {r['cap']} | {r['fill_padded']:.2f} / {r['fill_packed']:.2f} "
        f"| {r['padded']['score']:.3f} / {r['packed']['score']:.3f} | "
        f"{r['speedup']['score']:.2f}x | {r['padded']['update']:.3f} / "
        f"{r['packed']['update']:.3f} | {r['speedup']['update']:.2f}x |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="tiny,paper")
  parser.add_argument("--rows", type=int, default=0,
                      help="trajectories a step (0: 32 for tiny, 8 for paper: 4096-token rows "
                           "are slow on a CPU)")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  from zsjax import environment

  default_rows = {"tiny": 32, "paper": 8}
  results = {name: run_case(name, args.rows or default_rows[name], args.repeats, args.seed)
             for name in args.cases.split(",")}
  markdown = table(results)
  print(markdown)
  summary = {"cases": results, "environment": environment.describe(),
             "command": " ".join(["python", "experiments/bench_packing.py"] + (argv or sys.argv[1:]))}
  if args.out:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_packing.md").write_text(markdown)
    (out / "bench_packing.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
