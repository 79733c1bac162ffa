import json, numpy as np
from pathlib import Path
import sys
root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/abl")
ARMS = {"prompt-only simulator": "compare_real_search=False+seed={s}+tune_simulator=False",
        "fixed p = 0.5": "compare_real_search=False+rl.curriculum.kind=fixed+rl.curriculum.probability=0.5+seed={s}",
        "no noise": "compare_real_search=False+rl.curriculum.kind=fixed+rl.curriculum.probability=0.0+seed={s}",
        "no loss mask": "compare_real_search=False+rl.rl.loss_mask=response+seed={s}",
        "GRPO": "compare_real_search=False+rl.rl.algorithm=grpo+seed={s}",
        "PPO": "compare_real_search=False+rl.rl.algorithm=ppo+rl.rl.learning_rate=0.0003+seed={s}"}
def em(d, method="rl_simulator"):
  out = {}
  for line in open(root / d / "predictions.jsonl"):
    r = json.loads(line)
    if r["method"] == method: out[(r["set"], r["id"])] = r["em"]
  return out
out = {}
print("| default minus arm (EM points, paired over the same test questions) | seed 0 | seed 1 | seed 2 | mean of seeds |\n|---|---|---|---|---|")
base_bm25 = []
for name, pat in [("RL vs BM25 (real engine)", None)] + list(ARMS.items()):
  cells, means = [], []
  for s in (0, 1, 2):
    a = em(f"seed={s}")
    b = em(f"seed={s}", "rl_real_search") if pat is None else em(pat.format(s=s))
    keys = sorted(set(a) & set(b))
    d = np.array([a[k] - b[k] for k in keys]) * 100
    cells.append(f"{d.mean():+.1f} ± {d.std(ddof=1)/np.sqrt(len(d)):.1f}")
    means.append(d.mean())
  out[name] = means
  print(f"| {name} | " + " | ".join(cells) + f" | {np.mean(means):+.1f} |")
json.dump(out, open(root / "paired_vs_default.json", "w"), indent=1)
