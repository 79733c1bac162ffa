import json, sys
from pathlib import Path
import numpy as np
root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/abl")
ARMS = [
 ("default", "RL vs tuned simulator, curriculum 0 -> 0.5, REINFORCE, loss mask (default)", "seed={s}", "rl_simulator"),
 ("bm25", "RL vs BM25 (real engine)", "seed={s}", "rl_real_search"),
 ("prompt_only", "prompt-only simulator (pretrained, never tuned)", "compare_real_search=False+seed={s}+tune_simulator=False", "rl_simulator"),
 ("fixed05", "fixed p_noise = 0.5", "compare_real_search=False+rl.curriculum.kind=fixed+rl.curriculum.probability=0.5+seed={s}", "rl_simulator"),
 ("fixed0", "no noise (p = 0)", "compare_real_search=False+rl.curriculum.kind=fixed+rl.curriculum.probability=0.0+seed={s}", "rl_simulator"),
 ("nomask", "loss on inserted documents too (no mask)", "compare_real_search=False+rl.rl.loss_mask=response+seed={s}", "rl_simulator"),
 ("grpo", "GRPO (lr 1e-3)", "compare_real_search=False+rl.rl.algorithm=grpo+seed={s}", "rl_simulator"),
 ("ppo", "PPO (lr 3e-4)", "compare_real_search=False+rl.rl.algorithm=ppo+rl.rl.learning_rate=0.0003+seed={s}", "rl_simulator"),
]
seeds = (0, 1, 2)
def load(d):
  p = root / d / "results.json"
  return json.loads(p.read_text()) if p.exists() else None
out = {}
for key, name, pattern, method in ARMS:
  out[key] = []
  for s in seeds:
    r = load(pattern.format(s=s))
    if r is None: out[key].append(None); continue
    m = r["methods"][method]
    g = r.get("gains_over_warm_start", {}).get(method, {})
    out[key].append(dict(all=100*m["all"]["em"], single=100*m["single_hop"]["em"], two=100*m["two_hop"]["em"],
                         searches=m["searches_per_question"], two_searches=m["two_hop"]["searches"],
                         gain=100*g.get("em", float('nan')), se=100*g.get("stderr", float('nan')),
                         warm=100*r["methods"]["warm_start"]["all"]["em"],
                         rag=100*r["methods"]["rag"]["all"]["em"], direct=100*r["methods"]["direct"]["all"]["em"],
                         seconds=r.get("total_seconds")))
def ms(vals):
  vals = [v for v in vals if v is not None]
  if not vals: return "-"
  return f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1) if len(vals)>1 else 0:.1f}"
print("| arm | seed 0 | seed 1 | seed 2 | mean ± std |\n|---|---|---|---|---|")
w = out["default"]
print("| warm start (no RL) | " + " | ".join(f"{x['warm']:.1f}" if x else "-" for x in w) + f" | {ms([x['warm'] for x in w if x])} |")
for key, name, _, _ in ARMS:
  xs = out[key]
  print(f"| {name} | " + " | ".join(f"{x['all']:.1f}" if x else "-" for x in xs) + f" | {ms([x['all'] for x in xs if x])} |")
print("| *baselines: RAG / direct* | " + " | ".join(f"{x['rag']:.1f} / {x['direct']:.1f}" if x else "-" for x in w) + " | |")
print()
print("| arm | all | single-hop | two-hop | searches / question | two-hop searches | gain over warm start (per seed, ± s.e.) |\n|---|---|---|---|---|---|---|")
for key, name, _, _ in ARMS:
  xs = [x for x in out[key] if x]
  print(f"| {name} | {ms([x['all'] for x in xs])} | {ms([x['single'] for x in xs])} | {ms([x['two'] for x in xs])} | {np.mean([x['searches'] for x in xs]):.2f} | {np.mean([x['two_searches'] for x in xs]):.2f} | " + ", ".join(f"{x['gain']:+.1f} ± {x['se']:.1f}" for x in xs) + " |")
json.dump(out, open(root / "ablation_tables.json", "w"), indent=1)
