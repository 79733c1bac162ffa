"""Does the policy learn to read? One tiny-world training stage, probed on a world
it never saw (issue 27: the warm start's reading forms after a plateau whose
length depends on the seed and the float rounding).

  python experiments/reading_probe.py --name=base --seed=1 --set=sft.total_steps=600
  python experiments/reading_probe.py --name=drills1 --seed=1 --data=drills --documents=1 \\
      --set=sft.total_steps=300 --set=sft.max_length=128 --set=sft.batch_size=16 --export
  python experiments/reading_probe.py --name=full --seed=1 --init=ROOT/drills1_s1/hf_export

Trains the tiny world's ``warm_start`` sft job (``configs/tiny_world.py``, its
fields changed by ``--set=FIELD=VALUE``) from random weights, or from ``--init``
(an HF export of an earlier probe), on one of:

* ``--data=demos``: the warm start's demonstrations (``demonstrations.warm_start_rows``);
* ``--data=drills``: reading drills only (the reading stage's,
  ``demonstrations.reading_rows``: 3 per single-hop question, 1 to
  ``--documents`` documents, shuffled);
* ``--data=both``: the two together.

Every ``sft.eval_every`` steps it measures the answer NLL (loss on the answer's
name, ``</answer>`` and EOS only) on a world no stage trains on: on search
demonstrations whose documents hold the answer (``probe/demos``, when they fit
``sft.max_length``) and on drills with 1 to 3 shuffled documents
(``probe/drills``). Reading formed: ~0.05; not formed: ~0.8 and above.
Output: ``ROOT/NAME_sSEED/`` (the job's metrics, TensorBoard, probes.jsonl) and a
final JSON line with the curves, the seconds and the environment.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs import tiny_world  # noqa: E402
from zsjax import demonstrations, environment, pipeline, tinyworld, train_sft  # noqa: E402
from zsjax.data import write_jsonl  # noqa: E402
from zsjax.search import BM25Engine  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_rl import apply_overrides  # noqa: E402  (a typed --set FIELD=VALUE)


def probe_rows(seed: int, config) -> dict[str, list[dict]]:
  """The probes' rows on a world no stage trains on, answer-only loss."""
  size = tinyworld.WorldSize.from_config(config.world)
  world = tinyworld.generate(10**6 + seed, size)
  engine = BM25Engine([d["contents"] for d in world["corpus"]], top_k=config.top_k)
  demos = demonstrations.answer_check_rows(world, config, seed)
  drills = [dict(r, target_loss=[0, 0, 0, 1]) for r in demonstrations.reading_drills(
      world, engine, seed, per_question=1, max_documents=config.top_k)]
  # the warm start's own check (its test split), whole and by relation
  check = demonstrations.reading_check_rows(config)
  by_relation = {f"check/{rel}": [r for r in check if r["relation"] == rel]
                 for rel in sorted({r["relation"] for r in check})}
  return {"demos": demos, "drills": drills, "check": check, **by_relation}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--name", required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--root", default="/tmp/zsjax_reading")
  parser.add_argument("--data", choices=("demos", "drills", "both"), default="demos")
  parser.add_argument("--documents", type=int, default=1, help="drills: most documents shown")
  parser.add_argument("--init", default="", help="an HF export to start from")
  parser.add_argument("--export", action="store_true", help="write hf_export/ (for --init)")
  parser.add_argument("--checkpoint_every", type=int, default=0,
                      help="keep an Orbax checkpoint every N steps (answer_choice.py reads them); "
                           "0: none")
  parser.add_argument("--set", action="append", default=[], help="FIELD=VALUE of the sft job")
  parser.add_argument("--config_set", action="append", default=[],
                      help="FIELD=VALUE of the tiny world's config (e.g. demo_balance_relations=True)")
  parser.add_argument("--arg", default="v2", help="the tiny world config's arg")
  parser.add_argument("--instruction", default=None,
                      help="the search template's instruction (default: the tiny world's)")
  parser.add_argument("--demo_docs", type=int, default=0,
                      help="demos: show at most this many documents a search (the one holding "
                           "the answer among them); 0: all")
  parser.add_argument("--doc_loss", action="store_true",
                      help="also train on the inserted documents (a language-model loss on "
                           "each observation: dense copying signal in the real contexts)")
  args = parser.parse_args(argv)

  config = tiny_world.get_config(args.arg)  # v2: the probes of results/reading_probe
  config.seed, config.progress = args.seed, False
  apply_overrides(config, dict(item.split("=", 1) for item in args.config_set))
  if args.instruction is not None:
    config.instruction = args.instruction
  out = Path(args.root) / f"{args.name}_s{args.seed}"
  out.mkdir(parents=True, exist_ok=True)
  world = tinyworld.ensure(out / "world", args.seed, tinyworld.WorldSize.from_config(config.world))
  rows = [r for r in demonstrations.warm_start_rows(config, documents=args.demo_docs)
          if r["split"] == "train"] if args.data != "drills" else []
  if args.data != "demos":  # the reading stage's drills (its own held-out check left out)
    config.reading_drills, config.reading_documents = 3, args.documents
    rows += [r for r in demonstrations.reading_rows(config) if r["split"] == "train"]
  if args.doc_loss:
    rows = [dict(r, target_loss=[1 if "<information>" in seg else loss for seg, loss in
                                 zip(r["target_segments"], r["target_loss"])]) for r in rows]
  job = pipeline.job_config(config, "warm_start", {"tokenizer": world["tokenizer"]})
  apply_overrides(job, dict(item.split("=", 1) for item in args.set))
  job.checkpoint.export_hf, job.checkpoint.every = args.export, args.checkpoint_every or 10**9
  if args.checkpoint_every:  # keep them all: answer_choice.py reads any of them
    job.checkpoint.max_to_keep = 10**4
  if args.init:
    job.model.checkpoint = args.init
  probes = probe_rows(args.seed, config)
  curves: dict[str, list] = {name: [] for name in probes}

  job.sft.data = str(write_jsonl(out / "data.jsonl", [dict(r, split="train") for r in rows]))
  sft = train_sft.setup(job, out)
  packed = {}
  for name, probe in probes.items():
    try:
      packed[name], _ = train_sft.packed_split(sft.tokenizer, probe, job.sft.max_length,
                                               sft.tokenizer.eos_token_id,
                                               sft.tokenizer.pad_token_id or 0, name)
    except ValueError:  # nothing fits max_length (demos in short rows)
      curves.pop(name)
  sft.held_out = None  # the probes below replace the job's own held-out split

  def probe(step, state):
    for name, rows_ in packed.items():
      nll = train_sft.evaluate_nll(sft.eval_fn, state.params, rows_, job.sft.batch_size, sft.plan)
      curves[name].append([step, round(nll, 4)])
    with open(out / "probes.jsonl", "a") as f:
      f.write(json.dumps({"step": step, **{k: v[-1][1] for k, v in curves.items()}}) + "\n")

  update = sft.update

  def probed_update(state, batch, key):
    state, metrics = update(state, batch, key)
    step = int(state.step)
    if step % job.sft.eval_every == 0:
      probe(step, state)
    return state, metrics

  sft.update = probed_update
  start = time.time()
  summary = train_sft.train(sft)
  result = {"name": args.name, "seed": args.seed, "data": args.data, "doc_loss": args.doc_loss,
            "demo_docs": args.demo_docs, "instruction": config.instruction,
            "documents": args.documents, "init": args.init, "set": args.set,
            "seconds": round(time.time() - start, 1), "rows": len(rows),
            "train_nll_last": summary.get("loss/nll"),
            **{f"probe/{k}": v for k, v in curves.items()},
            "environment": environment.describe()}
  (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
