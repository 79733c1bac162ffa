"""Does a warm start read the document the question names, or copy Doc 1? A diagnostic.

  python experiments/reading_order.py --workdir=/tmp/tw4/seed_2_one_core --seed=2 --step=2100 \\
      [--arg=v4] [--set=demo_shuffle_documents=True]

The warm start's reading check (``demonstrations.reading_check_rows``, in the
engine's order, where the document holding the answer is nearly always Doc 1) is
scored three times with that document moved: first (as the engine gives it),
second, last; the other documents keep their order. The policy is restored from
the run's warm-start checkpoint ``--step``. A reader scores about the same answer
NLL wherever the document stands; a policy that copies a field of Doc 1 by its
distance from the answer tag scores ~0.05 first and far worse elsewhere. Prints the
NLL by position and relation and a final JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zsjax import demonstrations, template  # noqa: E402
from zsjax.data import write_jsonl  # noqa: E402
import warm_start_state  # noqa: E402

POSITIONS = ("first", "second", "last")


def moved(row: dict, position: str) -> dict | None:
  """``row`` with the document holding its answer (the first that does, or the one
  its ``<think>`` cites, ``demo_think="cite"``: "Doc 2: Employer of S:") moved to
  ``position``; None when the search shows fewer than two documents. The citation
  follows the document to its new number, so the check asks for the cited
  document's name wherever it stands."""
  segments = list(row["target_segments"])
  docs = [d.strip() for d in warm_start_state.DOCUMENTS.findall(segments[1])]
  gold = demonstrations.answer_name(row)
  if len(docs) < 2:
    return None
  cited = [int(m.group(1)) - 1 for m in map(demonstrations.CITED.match, segments) if m]
  held = docs.pop(cited[0] if cited else next(i for i, d in enumerate(docs) if gold in d))
  at = {"first": 0, "second": 1, "last": len(docs)}[position]
  docs.insert(at, held)
  segments[1] = template.render_observation(docs)
  segments = [demonstrations.CITED.sub(f"<think> {demonstrations.CITATION.format(at + 1)}", s)
              for s in segments]
  return dict(row, target_segments=segments, target="".join(segments))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  warm_start_state.add_run_arguments(parser)
  args = parser.parse_args(argv)
  run = Path(args.workdir)
  config = warm_start_state.run_config(args)
  config.demo_shuffle_documents = False  # the engine's order: the answer's document first
  check = demonstrations.reading_check_rows(config)
  result = {"workdir": str(run), "step": args.step, "nll": {}}
  with tempfile.TemporaryDirectory() as tmp:
    data = str(write_jsonl(Path(tmp) / "data.jsonl", [dict(r, split="train") for r in check]))
    job, sft, state = warm_start_state.restore(run, config, args.step, data, Path(tmp),
                                               stop_nll=0.0, stop_group="")
    by_relation = collections.defaultdict(list)
    for row in check:
      by_relation[row["relation"]].append(row)
    for position in POSITIONS:
      result["nll"][position] = {}
      for relation, rows in sorted(by_relation.items()):
        rows = [r for r in (moved(row, position) for row in rows) if r is not None]
        result["nll"][position][relation] = warm_start_state.answer_nll(job, sft, state.params, rows)
  relations = sorted(result["nll"]["first"])
  print("| answer's document | " + " | ".join(relations) + " |")
  print("|---|" + "---|" * len(relations))
  for position in POSITIONS:
    print(f"| {position} | " + " | ".join(f"{result['nll'][position][r]:.2f}" for r in relations)
          + " |")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
