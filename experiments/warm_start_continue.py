"""Continue a tiny-world warm start from one of its checkpoints with other data or
settings, and watch its check by relation: a diagnostic (issue 27).

  python experiments/warm_start_continue.py --workdir=/tmp/tw6/seed_0_b32 --seed=0 \\
      --step=1000 --batch=32 --out=/tmp/focus/born_located --more=born_in,located_in
  python experiments/warm_start_continue.py --workdir=/tmp/tw4/seed_0 --seed=0 \\
      --step=3000 --out=/tmp/focus/b8_focus --focus=0.5 --steps=600

The run's warm start (``WORKDIR/warm_start``: its Orbax checkpoint at ``--step``, its
demonstrations ``data.jsonl`` and the world's tokenizer) is exported as an HF model
and trained on by the ``warm_start`` job of ``configs/tiny_world.py:--arg`` for
``--steps`` more steps (the optimizer's moments start afresh: run a control, the
same command without ``--more``/``--focus``, beside each change), with the check by
relation every 50 steps (``eval/nll/<relation>`` in ``OUT/sft/metrics.jsonl``), the
rate held after a 2% warmup and a 100-step cooldown at the end.

* ``--more=REL,...``: ``--copies`` more copies of those relations' single-hop
  search and RAG demonstrations in the data (a fixed share);
* ``--focus=F``: ``sft.focus`` (zsjax/train_sft.py): after each check, a share F of
  each batch from the relation whose check fails worst.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zsjax import pipeline, train_sft  # noqa: E402
from zsjax.checkpoint import export_hf  # noqa: E402
from zsjax.data import write_jsonl  # noqa: E402
import warm_start_state  # noqa: E402


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  warm_start_state.add_run_arguments(parser)
  parser.add_argument("--out", required=True)
  parser.add_argument("--batch", type=int, default=8, help="warm_start.sft.batch_size")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--more", default="", help="relations to give more demonstrations")
  parser.add_argument("--copies", type=int, default=2)
  parser.add_argument("--focus", type=float, default=0.0, help="sft.focus")
  args = parser.parse_args(argv)
  run, out = Path(args.workdir), Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  config = warm_start_state.run_config(args)
  config.warm_start.sft.batch_size = args.batch
  tokenizer = str(run / "world" / "tokenizer")
  demos = run / "warm_start" / "data.jsonl"
  init = out / "init"
  if not (init / "config.json").exists():
    _, sft, state = warm_start_state.restore(run, config, args.step, str(demos), out / "setup")
    export_hf(init, sft.cfg, state.params, sft.tokenizer)
  more = set(filter(None, args.more.split(",")))
  if more:
    rows = [json.loads(line) for line in open(demos)]
    extra = [r for r in rows if r["split"] == "train" and r["hops"] == 1
             and r["relation"] in more and r["format"] in ("search", "rag")]
    demos = write_jsonl(out / "data.jsonl", rows + extra * args.copies)
  job = pipeline.job_config(config, "warm_start", {"tokenizer": tokenizer,
                                                   "sft.data": str(demos),
                                                   "model.checkpoint": str(init)})
  job.sft.update(dict(total_steps=args.steps, eval_every=50, warmup_fraction=0.02,
                      cooldown_steps=100, focus=args.focus))
  job.checkpoint.export_hf = False
  train_sft.run(job, str(out / "sft"))
  checks = [json.loads(line) for line in open(out / "sft" / "metrics.jsonl")]
  result = {"workdir": str(run), "step": args.step, "more": sorted(more), "focus": args.focus,
            "checks": [{k: v for k, v in r.items() if k == "step" or k.startswith("eval/nll")}
                       for r in checks if "eval/nll" in r]}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
