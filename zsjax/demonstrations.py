"""The tiny world's demonstration data: what the warm start and the simulator's
tuning learn from (``zsjax.pipeline`` runs the stages that use them).

* ``demonstrations``: correct demonstrations on a world (never the test world)
  in the formats the evaluation prompts (the search template, RAG, direct);
  ``warm_start_rows`` gathers them over ``demonstration_worlds``, other seeds;
* ``QueryJudge``: a search is useful iff its documents answer the *query*,
  which the world knows;
* ``oracle_searches``: an oracle searcher's queries (the question, a two-hop
  question's bridge, a question about another entity) with useful and noisy
  results, labelled by ``QueryJudge``: the simulator's tuning pairs.
"""

from __future__ import annotations

import re

import numpy as np

from zsjax import tinyworld
from zsjax.evaluate import method_prompt
from zsjax.search import BM25Engine, SearchRequest
from zsjax.sim_tuning import RuleJudge, label_pairs
from zsjax.template import render_observation, render_prompt


# The formats the warm start demonstrates, each as the evaluation prompts it: the
# search template, and the direct and RAG baselines (``evaluate.method_prompt``).
DEMO_FORMATS = ("search", "rag", "direct")


THINK_STYLES = ("", "quote", "cite")  # config.demo_think: none, the clause, "Doc k:" and the clause
# How ``cite`` names the document (its 1-based number, as the observation numbers it),
# and the pattern that reads the number back from a ``<think>`` segment.
CITATION = "Doc {}:"
CITED = re.compile(r"^<think> Doc (\d+):")


def document_subject(document: str) -> str:
  """The entity a tiny-world document is about: its text before " is " (every
  document opens "<subject> is ...")."""
  return document.split(" is ", 1)[0]


def evidence(documents, target: str, query: str) -> tuple[int, str, str] | None:
  """The clause of ``documents`` that states ``target`` about the query's subject,
  split before the target, with the document's index: ``(0, "Employer of Liomves:",
  "Thulbon")`` from "Liomves is a painter. Birthplace of Liomves: Baibrer. Employer of
  Liomves: Thulbon." (the first document) for a query that names Liomves. The document
  is the first that holds ``target`` (as a word) and whose subject (its text before
  " is ") the query names; the clause is its sentence holding the target, cut after
  it. None where no document qualifies."""
  word = re.compile(rf"(?<!\w){re.escape(target)}(?!\w)")
  for index, doc in enumerate(documents):
    subject = document_subject(doc)
    if subject and re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", query):
      for sentence in re.split(r"(?<=\.) ", doc):
        found = word.search(sentence)
        if found and sentence[:found.start()].strip():
          return index, sentence[:found.start()].strip(), target
  return None


def think_segments(documents, target: str, query: str,
                   style: str = "quote") -> tuple[list[str], list[int]]:
  """``demo_think``'s reasoning after an observation: ``<think>`` quoting the
  clause that states ``target`` (``evidence``), as two segments, the clause's words
  and then the target with ``</think>``, both written by the policy (loss on both);
  nothing where no document states it. ``style="cite"`` names the document first
  ("<think> Doc 1: Employer of Liomves: Thulbon </think>", as the observation numbers
  it). In the engine's order that number is nearly always 1, so it tells the policy
  nothing it could learn to use; it matters where the documents are shuffled."""
  found = evidence(documents, target, query)
  if found is None:
    return [], []
  index, key, value = found
  key = f"{CITATION.format(index + 1)} {key}" if style == "cite" else key
  return [f"<think> {key}", f" {value} </think>"], [1, 1]


def demonstrations(world: dict, engine, instruction: str, seed: int, *,
                   bridge_fraction: float, baseline_fraction: float,
                   documents: int = 0, shuffle_documents: bool = False,
                   think: str = "") -> list[dict]:
  """Correct demonstrations on ``world`` (never the test world), each a row
  ``{"prompt", "target", "target_segments", "target_loss", "format", "hops"}``:

  * ``search``, one per training question: the template's prompt; the target
    searches the question and sees the engine's documents exactly as the rollout
    inserts them (no loss on them), and for a two-hop question, with probability
    ``bridge_fraction``, also searches the bridge entity its documents name;
    then it answers the gold answer. A two-hop demonstration without the second
    search answers without the evidence: when a second search pays is left to
    RL;
  * ``rag`` for a ``baseline_fraction`` of the questions: the RAG baseline's
    prompt (the engine's documents for the question) -> the gold answer;
  * ``direct`` for another such share: the direct baseline's prompt -> the
    gold answer (a world the model has not seen: the format only).

  The answer's name carries loss only where the context (the prompt and the
  inserted documents) holds it; ``<answer>`` always does. So the warm start is
  taught to read an answer, never to guess one: what it writes after evidence
  that does not answer is its own, as a base model's would be.

  ``documents`` > 0 shows at most that many of each search's documents, in the
  engine's order, the first one holding the answer always among them (shorter
  contexts in the real format: a reading curriculum); 0 shows them all.

  ``shuffle_documents`` shows each search's documents in a random order (drawn from
  a stream of its own, so every other draw is as without it). In the engine's
  order the answer is nearly always in Doc 1, and a 2-layer policy learns to copy
  a field of the first document by its distance from the answer tag, not to find
  the document the question names (experiments/results/tiny_world_v4, "Stop 42"):
  such a reader fails when the answer is in another document or the documents are
  of other lengths. In a random order only the question's subject finds it.

  ``think`` ("quote" or "cite"; "" none): after each observation that states what
  the hop looks for (the bridge entity of a two-hop question's first search, else
  the answer), the target quotes it in ``<think>`` (``think_segments``: "<think>
  Employer of Liomves: Thulbon </think>"), the same in single-hop RAG rows. The
  name is then written right after the document's own words for it, and the
  answer or the next query copies it from a few tokens back. The intent: a match
  of shared tokens instead of a distance from the answer tag. Measured (probes,
  experiments/results/tiny_world_v4, "Stop 43"): in the engine's order the
  relations form sooner, and the reader is still Doc 1's by position."""
  if think not in THINK_STYLES:
    raise ValueError(f"config.demo_think={think!r} is not one of {THINK_STYLES}: '' (no "
                     "<think>), 'quote' (the evidence's clause) or 'cite' ('Doc k:' and the clause).")
  rng = np.random.default_rng(seed)
  order = np.random.default_rng([seed, 1]) if shuffle_documents else None
  rows = []

  def answer(context: str) -> tuple[list[str], list[int]]:
    # The name is a training target only where the context holds it: reading is
    # taught, guessing is not (the tag is taught either way: the format).
    gold = q["golden_answers"][0]
    return ["<answer>", f" {gold} </answer>"], [1, int(gold in context)]

  for q in world["splits"]["train"]:
    queries = [q["question"]]
    if q["bridge"] and rng.random() < bridge_fraction:
      queries.append(q["bridge"])
    segments, loss, first_docs = [], [], None
    # what each search's documents are read for: a two-hop question's bridge entity first
    targets = ([q["bridge"], q["golden_answers"][0]] if len(queries) == 2
               else [q["bridge"] or q["golden_answers"][0]])
    for query, sought in zip(queries, targets):
      docs = engine.search([SearchRequest(query)]).documents[0]
      if documents:
        gold = q["golden_answers"][0]
        keep = [i for i, d in enumerate(docs) if gold in d][:1]
        keep += [i for i in range(len(docs)) if i not in keep][:documents - len(keep)]
        docs = [docs[i] for i in sorted(keep)]
      if order is not None:
        docs = [docs[i] for i in order.permutation(len(docs))]
      first_docs = docs if first_docs is None else first_docs
      segments += [f"<search> {query} </search>", render_observation(docs)]
      loss += [1, 0]  # the documents are inserted, not written: no loss on them
      if think:
        quote, quote_loss = think_segments(docs, sought, query, think)
        segments, loss = segments + quote, loss + quote_loss
    tail, tail_loss = answer("".join(segments))
    common = {"hops": q["hops"], "relation": q.get("relation", "")}
    rows.append({"prompt": render_prompt(q["question"], None, instruction, False),
                 "target": "".join(segments + tail), "target_segments": segments + tail,
                 "target_loss": loss + tail_loss, "format": "search", **common})
    draw = rng.random()
    for fmt, low in (("rag", 0.0), ("direct", baseline_fraction)):
      if low <= draw < low + baseline_fraction:
        prompt = method_prompt(fmt, q["question"], None, first_docs if fmt == "rag" else ())
        quote, quote_loss = (think_segments(first_docs, q["golden_answers"][0], q["question"], think)
                             if think and fmt == "rag" and q["hops"] == 1 else ([], []))
        tail, tail_loss = answer(prompt)
        rows.append({"prompt": prompt, "target": "".join(quote + tail),
                     "target_segments": quote + tail, "target_loss": quote_loss + tail_loss,
                     "format": fmt, **common})
  return rows


def reading_drills(world: dict, engine, seed: int, *, per_question: int,
                   max_documents: int) -> list[dict]:
  """Short reading exercises on ``world``'s single-hop training questions, in
  the search template's format without its instruction: the question, its
  search, an observation of 1 to ``max_documents`` of the engine's documents (the
  one holding the answer always among them, in a random order) and the answer.
  The query and the answer carry loss, the documents do not; ``per_question``
  drills per question.

  What they are for (``configs/tiny_world.py``, the reading stage): a search
  demonstration is ~160 tokens with one or two answer tokens in it, and a 2-layer
  model learns to read from it only after a plateau whose length depends on the
  seed and the float rounding. A one-document drill is ~45 tokens, so a 128-token
  row holds three; copying the question into the query trains the copying
  heads, and reading the answer off one document is the next step from there."""
  rng = np.random.default_rng(seed)
  rows = []
  for q in world["splits"]["train"]:
    if q["hops"] != 1:
      continue
    gold = q["golden_answers"][0]
    docs = list(engine.search([SearchRequest(q["question"])]).documents[0])
    holding = [d for d in docs if gold in d]
    if not holding:
      continue
    others = [d for d in docs if gold not in d]
    for _ in range(per_question):
      n = int(rng.integers(1, max_documents + 1))
      shown = [holding[0]] + [others[i] for i in rng.permutation(len(others))[:n - 1]]
      shown = [shown[i] for i in rng.permutation(len(shown))]
      segments = [f"<search> {q['question']} </search>", render_observation(shown), "<answer>",
                  f" {gold} </answer>"]
      rows.append({"prompt": f"Question: {q['question']}\n", "target": "".join(segments),
                   "target_segments": segments, "target_loss": [1, 0, 1, 1],
                   "format": "drill", "hops": 1})
  return rows


class QueryJudge:
  """The tiny world's judge of a search: useful iff the documents answer the
  *query* (the paper labels a result useful "if it holds enough to answer the
  query"), which the world knows: a query that is one of its questions is
  answered by a gold answer of that question, a query that names an entity by
  the entity's own documents (any of them). Other queries fall back to the
  trajectory's own question (``sim_tuning.RuleJudge``). Judging the query, not the
  question, is what keeps a tuned simulator from writing the answer into the
  results of a query about something else."""

  def __init__(self, questions: list[dict], corpus: list[dict]):
    self.golds = {q["question"]: list(q["golden_answers"]) for q in questions}
    self.entity_docs: dict[str, set[str]] = {}  # a person has two in a version 4 world
    for d in corpus:
      self.entity_docs.setdefault(d["title"], set()).add(d["contents"])
    self.by_answer = RuleJudge()

  def useful(self, question, golds, query, documents) -> bool:
    query = query.strip()
    if query in self.entity_docs:  # any of the entity's own documents
      return any(d.strip() in self.entity_docs[query] for d in documents)
    return self.by_answer.useful(question, self.golds.get(query, golds), query, documents)


def oracle_searches(sources, top_k: int, seed: int) -> tuple[list[dict], list[dict]]:
  """What an oracle searcher sees, as ``sim_tuning`` trajectories and labelled
  pairs. ``sources`` holds ``(id_prefix, questions, corpus, engine)`` per world;
  for each question the queries are the question, a two-hop question's bridge
  entity, and another question of the same relation (a query about the wrong
  entity, as a policy that miscopies a name would write). Each query is recorded
  twice: with the engine's top ``top_k`` documents, and with its best ``top_k``
  documents that do not answer the query (fewer, or none, when the engine finds
  fewer; labelling skips empty results). ``engine`` should return more than
  ``top_k``. Pairs are labelled with ``QueryJudge``."""
  rng = np.random.default_rng(seed)
  trajectories, pairs = [], []
  for prefix, questions, corpus, engine in sources:
    judge = QueryJudge(questions, corpus)
    by_relation: dict[str, list[dict]] = {}
    for q in questions:
      by_relation.setdefault(q.get("relation", ""), []).append(q)
    source = []
    for q in questions:
      queries = [q["question"]] + ([q["bridge"]] if q["bridge"] else [])
      others = [o for o in by_relation[q.get("relation", "")] if o["question"] != q["question"]]
      if others:
        queries.append(others[rng.integers(len(others))]["question"])
      searches = []
      for query, docs in zip(queries, engine.search([SearchRequest(x) for x in queries]).documents):
        without = [d for d in docs if not judge.useful(q["question"], q["golden_answers"], query,
                                                       [d])][:top_k]
        searches += [{"query": query, "documents": list(docs[:top_k])},
                     {"query": query, "documents": without}]
      source.append({"id": prefix + q["id"], "question": q["question"],
                     "golden_answers": list(q["golden_answers"]), "searches": searches,
                     "answer": None, "correct": 0.0, "f1": 0.0})
    trajectories += source
    pairs += label_pairs(source, judge)
  return trajectories, pairs

def demonstration_worlds(config) -> list[dict]:
  """The ``demo_worlds`` worlds the warm start is demonstrated on (other seeds than
  ``config.seed``, the same size)."""
  if config.demo_worlds < 1:
    raise ValueError(f"config.demo_worlds={config.demo_worlds}: the warm start needs at least "
                     "one other world to demonstrate on (64 by default).")
  return [tinyworld.generate(config.seed + 7919 * (k + 1), tinyworld.WorldSize.from_config(config.world))
          for k in range(config.demo_worlds)]


def held_out_world(config) -> dict:
  """A further world, never demonstrated: the reading checks' (``reading_rows``,
  ``warm_start_rows``) test questions."""
  return tinyworld.generate(config.seed + 7919 * (config.demo_worlds + 1),
                            tinyworld.WorldSize.from_config(config.world))


def reading_rows(config) -> list[dict]:
  """The reading stage's data: ``reading_drills`` (``config.reading_drills`` per
  single-hop question, at most ``config.reading_documents`` documents each) on the
  ``demonstration_worlds`` as ``split="train"``, and one drill per question of a
  further world, never demonstrated, with loss on the answer only, as
  ``split="test"``: its held-out NLL is the stage's check that reading formed."""
  worlds = demonstration_worlds(config)
  rows = []
  for k, world in enumerate(worlds + [held_out_world(config)]):
    test = k == len(worlds)
    engine = BM25Engine([d["contents"] for d in world["corpus"]], top_k=config.top_k)
    drills = reading_drills(world, engine, config.seed + k, max_documents=config.reading_documents,
                            per_question=1 if test else config.reading_drills)
    for row in drills:
      if test:
        row = dict(row, target_loss=[0, 0, 0, 1])
      rows.append(dict(row, split="test" if test else "train"))
  return rows


def warm_start_rows(config, documents: int = 0) -> list[dict]:
  """Every demonstration the warm start trains on (``demonstrations`` of each of
  ``demonstration_worlds``, BM25 with ``top_k`` as the engine; never this world's
  questions) as ``split="train"``, and the reading check as ``split="test"``: the
  single-hop search demonstrations of ``held_out_world`` whose documents hold the
  answer, with loss on the answer only. Its NLL is ~0.05 once the policy reads
  (copies the answer from the documents) and ~0.8 or more while it guesses; the
  warm start may stop on it (``sft.stop_nll``)."""
  worlds = demonstration_worlds(config)
  if config.demo_this_world:  # CI only: see configs/tiny_world.py
    worlds.append(tinyworld.generate(config.seed, tinyworld.WorldSize.from_config(config.world)))
  rows = []
  for k, world in enumerate(worlds):
    engine = BM25Engine([d["contents"] for d in world["corpus"]], top_k=config.top_k)
    rows += demonstrations(world, engine, config.instruction, config.seed + k,
                           bridge_fraction=config.demo_bridge_fraction,
                           baseline_fraction=config.demo_baseline_fraction,
                           documents=documents, shuffle_documents=config.demo_shuffle_documents,
                           think=config.demo_think)
  if config.demo_balance_relations:
    rows = balance_relations(rows)
  return ([dict(r, split="train") for r in rows]
          + [dict(r, split="test") for r in reading_check_rows(config)])


def reading_check_rows(config) -> list[dict]:
  """The warm start's reading check (``warm_start_rows``' test split, without the
  split): ``answer_check_rows`` of ``held_out_world``'s single-hop questions."""
  return answer_check_rows(held_out_world(config), config, config.seed, hops=(1,))


def balance_relations(rows: list[dict]) -> list[dict]:
  """``rows`` with each single-hop relation's search demonstrations repeated
  (rounded to whole copies) to as many as the most frequent relation has. In the
  tiny world a film's director is asked ~2.5x less often than an employer, and its
  documents are the hardest to tell apart (films whose titles share a word), so
  its reading formed last, if at all (experiments/results/tiny_world_v3)."""
  single = [r for r in rows if r["hops"] == 1 and r["format"] == "search"]
  counts: dict[str, int] = {}
  for r in single:
    counts[r["relation"]] = counts.get(r["relation"], 0) + 1
  most = max(counts.values(), default=0)
  extra = [dict(r) for r in single for _ in range(round(most / counts[r["relation"]]) - 1)]
  return rows + extra


def answer_check_rows(world: dict, config, seed: int, hops=(1, 2)) -> list[dict]:
  """The search demonstrations of ``world`` (BM25 with ``config.top_k``, the search
  template with ``config.instruction``) whose documents hold the answer, for
  questions of ``hops``, with loss on the answer only: a check of reading. With
  ``config.demo_shuffle_documents`` the documents are in a random order, as in the
  demonstrations: the check then asks for a reader, not a copier of Doc 1. The
  loss is on the segment where the policy first writes the answer: the answer's,
  or with ``config.demo_think`` the quote's (the answer then copies the quote)."""
  engine = BM25Engine([d["contents"] for d in world["corpus"]], top_k=config.top_k)
  rows = [r for r in demonstrations(world, engine, config.instruction, seed,
                                    bridge_fraction=0.0, baseline_fraction=0.0,
                                    shuffle_documents=config.demo_shuffle_documents,
                                    think=config.demo_think)
          if r["hops"] in hops and r["target_loss"][-1]]  # the documents hold the answer
  out = []
  for r in rows:
    at = first_answer(r)
    out.append(dict(r, target_loss=[int(i == at) for i in range(len(r["target_loss"]))]))
  return out


def answer_name(row: dict) -> str:
  """The name ``row``'s target answers: its last segment is `` X </answer>``."""
  return row["target_segments"][-1].removesuffix("</answer>").strip()


def first_answer(row: dict) -> int:
  """The index of the first segment of ``row``'s target that the policy writes (loss
  1) and that holds its answer (``answer_name``)."""
  gold = answer_name(row)
  word = re.compile(rf"(?<!\w){re.escape(gold)}(?!\w)")
  at = next((i for i, (text, loss) in enumerate(zip(row["target_segments"], row["target_loss"]))
             if loss and word.search(text)), None)
  if at is None:
    raise ValueError(f"a row whose target never writes its answer {gold!r} with loss (a direct "
                     f"row, or documents without it): {row['target_segments']!r}")
  return at


__all__ = ["DEMO_FORMATS", "demonstrations", "QueryJudge", "oracle_searches",
           "demonstration_worlds", "held_out_world", "reading_drills", "reading_rows", "warm_start_rows",
           "answer_check_rows", "reading_check_rows", "balance_relations", "evidence",
           "document_subject", "think_segments", "CITATION", "CITED", "answer_name",
           "first_answer", "THINK_STYLES"]
