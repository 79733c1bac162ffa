"""Which name a warm start answers with, where it does not read: a diagnostic.

  python experiments/answer_choice.py --workdir=/tmp/tw4/seed_0 --seed=0 --step=2000 \\
      [--arg=v4] [--relations=works_for,born_in]

For every other check row of ``relations`` (the warm start's held-out check,
``demonstrations.reading_check_rows``), every capitalised name in the row's three
documents is scored as the answer (where the row first writes it: the answer, or
with ``demo_think`` the quote) (its answer NLL, the policy restored from the
stage's Orbax checkpoint at ``--step``, so a stage still training can be read; or a
reading probe's, ``experiments/reading_probe.py --checkpoint_every``), and
the best one is counted by where it stands: ``gold``, or ``docK:<the word before
it>`` (e.g. ``doc2:Employer``, another document's field of the same name). Prints a
count per relation and a final JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zsjax import demonstrations  # noqa: E402
from zsjax.data import write_jsonl  # noqa: E402
import warm_start_state  # noqa: E402



def where(name: str, gold: str, k: int, doc: str) -> str:
  """``gold``, or ``docK:`` and what precedes ``name`` in its sentence, the document's
  subject written S: ``doc2:Employer`` (version 2 worlds), ``doc2:Employer of S``
  (version 3), ``doc2:S employer`` (version 5), ``doc1:subject`` (the document's own
  subject); a name in a list, the word before it."""
  if name == gold:
    return "gold"
  before = doc.split(name)[0].strip()
  if not before:
    return f"doc{k + 1}:subject"
  clause = before.split(". ")[-1].rstrip(":")
  subject = demonstrations.document_subject(doc)
  field = ":" in before[-1:] or (clause.startswith(subject + " ") and len(clause.split()) == 2)
  return f"doc{k + 1}:" + (clause.replace(subject, "S") if field else before.split()[-1])


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  warm_start_state.add_run_arguments(parser)
  parser.add_argument("--relations", default="works_for,born_in")
  args = parser.parse_args(argv)
  run = Path(args.workdir)
  config = warm_start_state.run_config(args)
  relations = args.relations.split(",")
  check = [r for r in demonstrations.reading_check_rows(config) if r["relation"] in relations]
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  with tempfile.TemporaryDirectory() as tmp:
    data = str(write_jsonl(Path(tmp) / "data.jsonl", [dict(r, split="train") for r in check]))
    job, sft, state = warm_start_state.restore(run, config, args.step, data, Path(tmp),
                                               stop_nll=0.0, stop_group="")
    for row in check[::2]:
      # the segment that first writes the answer: the answer's, or the quote's in <think>
      segments, at = row["target_segments"], demonstrations.first_answer(row)
      gold = demonstrations.answer_name(row)
      close = segments[at][len(f" {gold}"):]
      observation = [s for s in segments[:at] if s.startswith("\n\n<information>")][-1]
      names = {}
      for k, doc in enumerate(warm_start_state.DOCUMENTS.findall(observation)):
        for name in re.findall(r"\b[A-Z][a-z]+\b", doc):
          names.setdefault(name, where(name, gold, k, doc))
      nll = {}
      for name in names:
        answer = dict(row, target_segments=segments[:at] + [f" {name}{close}"] + segments[at + 1:])
        nll[name] = warm_start_state.answer_nll(job, sft, state.params, [answer])
      counts[row["relation"]][names[min(nll, key=nll.get)]] += 1
  result = {"workdir": str(run), "step": args.step,
            "best_answer": {rel: dict(c.most_common()) for rel, c in counts.items()}}
  for rel, c in result["best_answer"].items():
    print(f"{rel}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
