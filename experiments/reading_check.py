"""Which relations a finished warm start reads: its held-out reading check by relation.

  python experiments/reading_check.py --workdir=/tmp/tw3/seed_0 --seed=0 [--arg=v3] \\
      [--stage=warm_start]        # or warm_start.failed, a stage the check refused

The warm start's check (``demonstrations.reading_check_rows``: single-hop
search demonstrations of a world never demonstrated, loss on the answer only) is
scored with the stage's ``hf_export`` one row at a time, and reported by relation:
the mean answer NLL, and the share of rows whose NLL is above ln 2 (the answer's
tokens less likely than even). A relation at ~ln 3 = 1.1 picks among the three
documents' names without telling them apart. Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs import tiny_world  # noqa: E402
from zsjax import demonstrations, pipeline, train_sft  # noqa: E402
from zsjax.data import write_jsonl  # noqa: E402


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a tiny world run")
  parser.add_argument("--seed", type=int, required=True, help="the run's config.seed")
  parser.add_argument("--arg", default="default", help="the run's config arg")
  parser.add_argument("--stage", default="warm_start")
  args = parser.parse_args(argv)
  run = Path(args.workdir)
  stage = run / args.stage
  if not (stage / "hf_export").exists():
    raise SystemExit(f"{stage / 'hf_export'} does not exist: --stage names a finished policy stage.")
  config = tiny_world.get_config(args.arg)
  config.seed, config.progress = args.seed, False
  check = demonstrations.reading_check_rows(config)
  job = pipeline.job_config(config, "warm_start", {"tokenizer": str(run / "world" / "tokenizer")})
  job.model.checkpoint = str(stage / "hf_export")
  job.sft.stop_nll = 0.0
  with tempfile.TemporaryDirectory() as tmp:
    job.sft.data = str(write_jsonl(Path(tmp) / "data.jsonl",
                                   [dict(r, split="train") for r in check]))
    sft = train_sft.setup(job, tmp)
    eos, pad = sft.tokenizer.eos_token_id, sft.tokenizer.pad_token_id or 0
    nll = []
    for row in check:
      examples, _ = train_sft.tokenize_examples(sft.tokenizer, [row], job.sft.max_length, eos)
      packed = train_sft.pack(examples, job.sft.max_length, pad)
      nll.append(train_sft.evaluate_nll(sft.eval_fn, sft.state.params, packed,
                                        job.sft.batch_size, sft.plan))
  relations = {}
  for rel in sorted({r["relation"] for r in check}):
    values = np.array([v for r, v in zip(check, nll) if r["relation"] == rel])
    relations[rel] = {"rows": len(values), "nll": float(values.mean()),
                      "unread": float((values > math.log(2)).mean())}
  # the stage's own check weights rows by their answer tokens; this is per row
  print(f"{stage}: held-out answer NLL by relation (rows: {len(check)}; mean per row "
        f"{np.mean(nll):.3f})\n")
  print("| relation | rows | mean NLL | share unread (NLL > ln 2) |\n|---|---|---|---|")
  for rel, v in relations.items():
    print(f"| {rel} | {v['rows']} | {v['nll']:.3f} | {v['unread']:.2f} |")
  result = {"stage": str(stage), "seed": args.seed, "rows": len(check),
            "nll": float(np.mean(nll)), "relations": relations}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
