"""Evaluation (``job="eval"``): any policy, any engine, any QA sets, and baselines.

Methods (the same harness, greedy decoding, the same scoring):

  search  the tagged template with a search engine (the trained method, or the
          base model "without RL");
  direct  answer at once, no search;
  cot     reason, then answer, no search;
  rag     one retrieval with the question as the query, the documents in the
          prompt, then answer (no further search).

Every question of every set is evaluated (the last batch is padded and the
padding dropped); a set larger than ``sample_size`` is sampled with the seed.
Scores: substring EM (``substring_em``: the paper's "EM", the reference's
qa_em.py), strict EM (``em``) and F1 (``zsjax.rewards``) of the last
``<answer>`` the policy wrote, per set and averaged over sets. Outputs in the
workdir: ``results.json`` (``methods.<method>.<set>.<metric>`` plus
``average``), ``results.md`` and ``results.csv`` tables, and
``predictions.jsonl`` with one record per question (the full trajectory text).
They are replaced only when a run completes (a run in progress writes
``results.partial.json`` and ``predictions.partial.jsonl``), and every method's
scores are over the same questions: a row RAG cannot fit is left out of all.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zsjax import data as data_lib
from zsjax import hf, rewards, search, template, tinyworld
from zsjax import rollout as rollout_lib
from zsjax.checkpoint import Checkpointer
from zsjax.curriculum import Curriculum
from zsjax.engine import NoEngine
from zsjax.rewards import policy_answer
from zsjax.sampling import Greedy
from zsjax.search import SearchRequest
from zsjax.sharding import ShardingPlan

METHODS = ("search", "direct", "cot", "rag")
METRICS = ("substring_em", "em", "f1")
# The column titles of results.md. The paper's "EM" is the reference's qa_em.py
# (verl/utils/reward_score/qa_em.py in Alibaba-NLP/ZeroSearch and Search-R1): a hit
# when the normalised gold answer lies inside the normalised prediction. Its
# numbers compare with `substring_em`, never with the strict `em`.
METRIC_TITLES = {"substring_em": "EM (paper's: gold inside answer)", "em": "strict EM",
                 "f1": "F1"}

DIRECT_INSTRUCTION = (
    "Answer the question below directly, with no explanation. Write only the answer between "
    "<answer> and </answer>, for example <answer> Lisbon </answer>.")
COT_INSTRUCTION = (
    "Answer the question below. First reason step by step inside <think> and </think>, then "
    "write only the answer between <answer> and </answer>, for example <answer> Lisbon </answer>.")
RAG_INSTRUCTION = (
    "Answer the question below using the documents that follow. Write only the answer between "
    "<answer> and </answer>, for example <answer> Lisbon </answer>.")


def method_prompt(method: str, question: str, tokenizer=None, documents: Sequence[str] = (),
                  use_chat_template: bool = False, search_instruction: str = "",
                  style: str = "zsjax") -> str:
  """The policy prompt of an evaluation method (``search_instruction`` replaces the
  style's instruction, for policies trained with another; ``style``, a
  ``template.PROMPT_STYLES`` name, is the search method's wording)."""
  if method == "search":
    return template.render_prompt(question, tokenizer, search_instruction,
                                  use_chat_template=use_chat_template, style=style)
  elif method == "direct":
    instruction = DIRECT_INSTRUCTION
  elif method == "cot":
    instruction = COT_INSTRUCTION
  elif method == "rag":
    instruction = f"{RAG_INSTRUCTION}\n{template.render_documents(documents)}"
  else:
    raise ValueError(f"evaluation method {method!r} is not one of {METHODS}.")
  return template.render_prompt(question, tokenizer, instruction,
                                use_chat_template=use_chat_template)


def method_prompts(method: str, questions: Sequence[str], tokenizer=None, *, retriever=None,
                   use_chat_template: bool = False, search_instruction: str = "",
                   style: str = "zsjax") -> list[str]:
  """The prompts ``Evaluator`` gives the policy for ``method``: ``method_prompt``
  of each question, with RAG's documents retrieved by ``retriever`` (a host
  engine) for the question itself."""
  documents = [[] for _ in questions]
  if method == "rag":
    if retriever is None:
      raise ValueError("method 'rag' needs a retriever (a BM25 engine).")

    documents = retriever.search([SearchRequest(q) for q in questions]).documents
  return [method_prompt(method, q, tokenizer, d, use_chat_template, search_instruction, style)
          for q, d in zip(questions, documents)]


def _score(prediction, golds) -> dict[str, float]:
  return {"em": rewards.exact_match(prediction, golds),
          "substring_em": rewards.substring_match(prediction, golds),
          "f1": rewards.f1(prediction, golds)}


class Evaluator:
  """Holds a jitted rollout per method for one policy and one engine."""

  def __init__(self, policy_cfg, params, tokenizer, *, engine=None, engine_state=None,
               retriever=None, rollout_config=None, batch_size: int = 8,
               prompt_width: int = 512, use_chat_template: bool = False, instruction: str = "",
               style: str = "zsjax", static=None, on_error: str = "raise"):
    """``engine``: a rollout engine (``zsjax.search.build_engine``) for the search
    method; ``retriever``: a host engine (BM25) for RAG's one retrieval; ``static``:
    the policy's ``rollout.StaticTokens`` when already made (they decode the vocabulary);
    ``style``: the search method's wording and feedback (``template.PROMPT_STYLES``);
    ``on_error``: a row whose prompt (with RAG's documents) is wider than
    ``prompt_width`` is skipped and listed in ``skipped`` ("skip") or stops the run
    naming it ("raise")."""
    self.cfg, self.params, self.tokenizer = policy_cfg, params, tokenizer
    self.static = static or rollout_lib.prepare_static_tokens(
        tokenizer, vocab_size=policy_cfg.vocab_size, feedback=template.prompt_style(style).feedback)
    self.matcher = template.build_tag_matcher(tokenizer, vocab_size=policy_cfg.vocab_size)
    self.engine, self.engine_state = engine, engine_state
    self.retriever = retriever
    self.config = rollout_config or rollout_lib.RolloutConfig()
    self.batch_size, self.prompt_width = batch_size, prompt_width
    self.use_chat_template = use_chat_template
    self.instruction, self.style = instruction, style
    self.on_error = on_error
    self.skipped: list[dict] = []  # {"set", "method", "id", "reason"} per row left out
    self._rollouts = {}

  def _rollout(self, method: str):
    if method not in self._rollouts:
      searching = method == "search"
      if searching and self.engine is None:
        raise ValueError("method 'search' needs an engine (simulator, bm25 or http).")
      config = self.config if searching else dataclasses.replace(self.config, max_turns=0)
      engine = self.engine if searching else NoEngine()
      self._rollouts[method] = (engine, jax.jit(rollout_lib.make_rollout(
          self.cfg, self.matcher, self.static, engine, config, Greedy())))
    return self._rollouts[method]

  def run_set(self, method: str, rows: Sequence[dict], set_name: str = "") -> list[dict]:
    """One record per row: prediction, scores, counts and the response text."""
    records = []
    b = self.batch_size
    engine, rollout = self._rollout(method)
    pairs = []  # (row, its prompt); RAG's prompts hold documents, so widths are known now
    for start in range(0, len(rows), b):
      chunk = list(rows[start:start + b])
      pairs += zip(chunk, method_prompts(
          method, [r["question"] for r in chunk], self.tokenizer, retriever=self.retriever,
          use_chat_template=self.use_chat_template, search_instruction=self.instruction,
          style=self.style))
    pairs = [(r, p) for r, p in pairs if self._fits(method, set_name, r, p)]
    for start in range(0, len(pairs), b):
      chunk_pairs = pairs[start:start + b]
      n = len(chunk_pairs)
      chunk_pairs += [chunk_pairs[-1]] * (b - n)  # one shape for every batch; padding dropped
      chunk = [r for r, _ in chunk_pairs]
      questions = [r["question"] for r in chunk]
      firsts = [list(r["golden_answers"])[0] for r in chunk]
      prompts = [p for _, p in chunk_pairs]
      batch = rollout_lib.prepare_batch(self.tokenizer, prompts, questions, firsts, engine,
                                        pad_id=self.static.pad_id, prompt_width=self.prompt_width)
      traj = jax.device_get(rollout(self.params, self.engine_state, batch, jax.random.key(0),
                                    jnp.int32(self.config.curriculum.total_steps)))
      for i in range(n):
        ids = np.asarray(traj.tokens[i])
        prediction = policy_answer(self.tokenizer, ids, traj.loss_mask[i])
        start_i, end_i = int(traj.prompt_lengths[i]), int(traj.lengths[i])
        records.append({
            "set": set_name, "id": chunk[i].get("id", str(start + i)), "method": method,
            "question": chunk[i]["question"], "golden_answers": list(chunk[i]["golden_answers"]),
            "prediction": prediction, **_score(prediction, list(chunk[i]["golden_answers"])),
            "turns": int(traj.turns[i]), "searches": int(traj.searches[i]),
            "failed_searches": int(traj.failed_searches[i]),
            "truncated": bool(traj.truncated[i]),
            "response": self.tokenizer.decode(ids[start_i:end_i].tolist(),
                                              skip_special_tokens=True)})
    return records

  def _too_wide(self, method: str, prompt: str) -> str | None:
    return rollout_lib.prompt_too_wide(self.tokenizer, prompt, self.prompt_width,
                                       "config.eval.prompt_width", method)

  def _fits_or_raise(self, method: str, row: dict, prompt: str) -> None:
    """A load-time check (``data.load_qa``'s ``check``): ``DataError`` naming the field."""
    problem = self._too_wide(method, prompt)
    if problem:
      raise data_lib.DataError(problem)

  def _fits(self, method: str, set_name: str, row: dict, prompt: str) -> bool:
    reason = self._too_wide(method, prompt)
    if reason is None:
      return True
    if self.on_error == "raise":
      raise ValueError(f"set {set_name!r}, row id {row.get('id')!r}: {reason}, or set "
                       "config.eval.on_error='skip' to leave them out.")
    logging.warning("skipping set %r row id %r: %s", set_name, row.get("id"), reason)
    self.skipped.append({"set": set_name, "method": method, "id": row.get("id"),
                         "reason": reason})
    return False


def summarize(records: Sequence[dict]) -> dict:
  """``{set: {metric: mean, "count": n}}`` plus ``"average"`` (the mean over sets).
  Records with ``searches`` add ``searches`` (per question), ``failed_searches``
  (calls that got no answer from the engine) and ``failed_share`` (their share)."""
  out: dict = {}
  for name in dict.fromkeys(r["set"] for r in records):
    rows = [r for r in records if r["set"] == name]
    out[name] = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
    out[name]["count"] = len(rows)
    if "searches" in rows[0]:
      out[name].update(_search_counts(rows))
  sets = list(out)
  out["average"] = {m: float(np.mean([out[s][m] for s in sets])) for m in METRICS}
  out["average"]["count"] = sum(out[s]["count"] for s in sets)
  if records and "searches" in records[0]:
    out["average"].update(_search_counts(records))
  return out


def _search_counts(rows: Sequence[dict]) -> dict:
  searches = sum(r["searches"] for r in rows)
  failed = sum(r.get("failed_searches", 0) for r in rows)
  return {"searches": searches / len(rows), "failed_searches": failed,
          "failed_share": failed / searches if searches else 0.0}


def write_tables(results: dict, directory: Path, metric_names=METRICS) -> str:
  """``results.md`` and ``results.csv``: one row per (method, set); returns the markdown."""
  titles = [METRIC_TITLES.get(m, m) for m in metric_names]
  lines = ["| method | set | n | " + " | ".join(titles) + " | failed searches |",
           "|---|---|---|" + "---|" * (len(metric_names) + 1)]
  csv_rows = [["method", "set", "n", *metric_names, "failed_searches", "failed_share"]]
  for method, sets in results["methods"].items():
    for name, scores in sets.items():
      values = [f"{100 * scores[m]:.1f}" for m in metric_names]
      failed = (f"{scores['failed_searches']} ({100 * scores['failed_share']:.1f}%)"
                if "failed_share" in scores else "-")
      lines.append(f"| {method} | {name} | {scores['count']} | " + " | ".join(values)
                   + f" | {failed} |")
      csv_rows.append([method, name, scores["count"], *[f"{scores[m]:.4f}" for m in metric_names],
                       scores.get("failed_searches", ""),
                       f"{scores['failed_share']:.4f}" if "failed_share" in scores else ""])
  markdown = "\n".join(lines) + (
      "\n\n(scores in %. The paper's EM is substring EM, the reference's qa_em.py: the "
      "normalised gold answer inside the normalised answer; strict EM needs them equal.)\n")
  if results.get("engine_failures"):
    markdown += "\n**The search engine failed:** " + " ".join(results["engine_failures"]) + "\n"
  if results.get("left_out"):
    listed = "; ".join(f"{name}: {len(ids)}" for name, ids in results["left_out"].items())
    markdown += ("\n**Rows left out of every method** (one method could not fit them: RAG's "
                 f"prompt with its documents wider than config.eval.prompt_width): {listed}. "
                 "n counts the questions every method answered; results.json keeps each "
                 "method's scores on all its rows in methods_every_row.\n")
  if results.get("not_comparable"):
    markdown += ("\n**Not comparable:** in " + ", ".join(results["not_comparable"]) + " no "
                 "question could be answered by every method (RAG's prompts are wider than "
                 "config.eval.prompt_width), so each method is scored on its own rows. Raise "
                 "config.eval.prompt_width.\n")
  if not results.get("complete", True):
    markdown += "\n**Incomplete:** the run stopped before every method and set was scored.\n"
  _replace(directory / "results.md", lambda p: p.write_text(markdown))

  def write_csv(p):
    with open(p, "w", newline="") as f:
      csv.writer(f).writerows(csv_rows)
  _replace(directory / "results.csv", write_csv)
  return markdown


def sample_rows(dataset, sample_size: int, seed: int) -> list[dict]:
  """All rows when the set is small enough, else ``sample_size`` of them (seeded, in order)."""
  n = len(dataset)
  if not sample_size or n <= sample_size:
    return [dataset[i] for i in range(n)]
  keep = sorted(np.random.default_rng(seed).choice(n, size=sample_size, replace=False).tolist())
  return [dataset[i] for i in keep]


# -------------------------------------------------------------------- the job


def load_policy(section, tokenizer, plan=None):
  """``(cfg, params)`` from ``section.checkpoint`` (HF directory), optionally with the
  params of an Orbax checkpoint (``section.orbax_dir``: an RL or SFT workdir's
  ``checkpoints/``; ``section.orbax_step``: 0 = latest)."""
  cfg, params = hf.load_model(section, plan, jax.random.key(0), len(tokenizer),
                           (tokenizer.eos_token_id,), what="policy")
  if section.orbax_dir:
    if not Path(section.orbax_dir).is_dir():  # Orbax would create it, then find nothing
      raise FileNotFoundError(f"config.policy.orbax_dir={section.orbax_dir!r} is not a "
                              "directory; give an RL or SFT workdir's checkpoints/ directory.")
    checkpointer = Checkpointer(section.orbax_dir, async_save=False)
    raw = checkpointer.restore_raw(section.orbax_step or None)
    tree = raw.get("policy", raw)
    loaded = tree["params"] if "params" in tree else tree
    want = jax.tree_util.tree_structure(params)
    if jax.tree_util.tree_structure(loaded) != want:
      raise ValueError(f"{section.orbax_dir}: the checkpoint's params do not match the model "
                       "of config.policy (architecture or sizes differ).")
    params = jax.tree_util.tree_map(lambda p, x: jnp.asarray(x, p.dtype), params, loaded)
  return cfg, params


PROMPT_FORMATS = ("checkpoint", "chat", "plain")


def prompt_format(config) -> tuple[bool, str, str]:
  """``(use_chat_template, instruction, style)`` of the policy's prompts:
  ``config.prompt_format="checkpoint"`` reads what the policy was trained with from
  its export (``zsjax_prompt.json``, written by the RL job), so the two cannot
  disagree; ``"chat"`` / ``"plain"`` choose by hand (a base model, a policy from
  elsewhere), with ``config.prompt_style`` and ``config.instruction`` (empty: the
  style's)."""
  kind, instruction = config.prompt_format, config.instruction
  if kind not in PROMPT_FORMATS:
    raise ValueError(f"config.prompt_format={kind!r} is not one of {PROMPT_FORMATS}.")
  if kind != "checkpoint":
    style = config.prompt_style
    return kind == "chat", template.instruction_of(style, instruction, "config.prompt_style"), style
  saved = template.load_prompt_format(config.policy.checkpoint) \
      if config.policy.checkpoint else None
  if saved is None:
    raise ValueError(
        f"config.prompt_format='checkpoint' but config.policy.checkpoint="
        f"{config.policy.checkpoint!r} has no {template.PROMPT_FORMAT_FILE} (zsjax's RL job "
        "writes it); say how the policy was prompted: --config.prompt_format=chat or plain.")
  if instruction and instruction != saved["instruction"]:
    raise ValueError(f"config.instruction differs from the one the policy was trained with "
                     f"({template.PROMPT_FORMAT_FILE}); leave config.instruction empty, or set "
                     "--config.prompt_format=chat or plain to override.")
  return saved["chat_template"], saved["instruction"], saved["style"]


def rollout_config_of(config) -> rollout_lib.RolloutConfig:
  """The evaluation rollout: ``config.rollout``, and a simulated engine's noise at
  ``config.simulator.noise_probability`` (fixed; 0 = useful documents only)."""
  return dataclasses.replace(
      rollout_lib.RolloutConfig.from_config(config.rollout),
      curriculum=Curriculum(kind="fixed", probability=config.simulator.noise_probability))


def parse_sets(spec: str) -> list[tuple[str, str]]:
  """``"nq=/data/nq.jsonl,hotpotqa=/data/hotpot.parquet,bamboogle"`` -> ``[(name, path)]``
  (no path: the hub copy, when online)."""
  out = []
  for item in [s for s in spec.split(",") if s.strip()]:
    name, _, path = item.partition("=")
    out.append((name.strip(), path.strip()))
  if not out:
    raise ValueError("config.eval.sets is empty; give 'name=path' pairs.")
  return out


@dataclasses.dataclass
class EvalJob:
  """What ``setup`` builds: the evaluator and the sampled rows of every set."""

  config: Any
  workdir: Path
  methods: list[str]
  evaluator: Evaluator
  sets: list  # (name, rows, [data.LoadReport]) per set


def setup(config, workdir: str | Path) -> EvalJob:
  """The policy, the engine and retriever, the evaluator, and every set loaded
  (rows whose prompts cannot fit reported or refused with file, row and field)."""
  workdir = Path(workdir)
  e = config.eval
  methods = [m.strip() for m in e.methods.split(",") if m.strip()]
  if not methods:
    raise ValueError(f"config.eval.methods={e.methods!r} names no method; give a comma-separated "
                     f"list of {METHODS}.")
  for m in methods:
    if m not in METHODS:
      raise ValueError(f"config.eval.methods has {m!r}; choose from {METHODS}.")
  if e.batch_size <= 0:
    raise ValueError(f"config.eval.batch_size={e.batch_size} must be a positive integer.")
  if e.sample_size < 0:
    raise ValueError(f"config.eval.sample_size={e.sample_size} must be >= 0 (0: every row).")
  workdir.mkdir(parents=True, exist_ok=True)
  config = tinyworld.fill_missing_data(
      config, workdir, "eval", "sets",
      lambda world: f"single_hop={world['test_single_hop']},two_hop={world['test_two_hop']}")
  e = config.eval
  tokenizer = hf.config_tokenizer(config, "policy")
  plan = ShardingPlan.single_device()
  cfg, params = load_policy(config.policy, tokenizer, plan)
  use_chat_template, instruction, style = prompt_format(config)
  rollout_config = rollout_config_of(config)
  engine = engine_state = retriever = None
  static = rollout_lib.prepare_static_tokens(tokenizer, vocab_size=cfg.vocab_size,
                                             eos_ids=hf.end_tokens(cfg, tokenizer),
                                             feedback=template.prompt_style(style).feedback)
  if config.engine.corpus:
    retriever = search.BM25Engine.from_jsonl(config.engine.corpus, top_k=config.engine.top_k,
                                             text_field=config.engine.text_field)
  if "search" in methods:
    engine, engine_state, _ = search.build_engine(
        config, tokenizer, static, rollout_config, plan, jax.random.key(1), greedy=True,
        prebuilt=retriever if config.engine.kind == "bm25" else None)  # one BM25 index
  evaluator = Evaluator(cfg, params, tokenizer, engine=engine, engine_state=engine_state,
                        retriever=retriever, rollout_config=rollout_config,
                        batch_size=e.batch_size, prompt_width=e.prompt_width,
                        use_chat_template=use_chat_template, instruction=instruction, style=style,
                        static=static, on_error=e.on_error)

  def check(row):  # the prompts known before retrieval fit; RAG's are checked per set
    for method in methods:
      if method != "rag":
        evaluator._fits_or_raise(method, row, method_prompt(
            method, row["question"], tokenizer, use_chat_template=use_chat_template,
            search_instruction=instruction, style=style))
    if engine is not None:
      problem = engine.row_problem(row["question"], row["golden_answers"][0])
      if problem:
        raise data_lib.DataError(problem)

  sets = []
  for name, path in parse_sets(e.sets):
    report: list = []
    dataset = data_lib.load_benchmark(name, path, on_error=e.on_error, report=report,
                                      check=check)
    sets.append((name, sample_rows(dataset, e.sample_size, config.seed), report))
  return EvalJob(config, workdir, methods, evaluator, sets)


# What a run in progress writes; a complete run renames them to the final names.
PARTIAL = {"predictions.jsonl": "predictions.partial.jsonl",
           "results.json": "results.partial.json"}


def evaluate(job: EvalJob) -> dict:
  """Every method on every set. While it runs, what is scored is written set by set
  to ``results.partial.json`` and ``predictions.partial.jsonl`` (a failure later
  loses nothing already scored); only a complete run replaces ``results.json``,
  ``results.md``, ``results.csv`` and ``predictions.jsonl``, each by a rename, so
  they always hold the latest complete run, whole. Rows one method had to leave
  out (RAG's prompt too wide) are left out of every method's scores, so the table
  compares the same questions (``left_out``; the unrestricted scores are kept in
  ``methods_every_row``). ``ok: False`` when the engine failed above the limit."""
  config, workdir, evaluator, sets = job.config, job.workdir, job.evaluator, job.sets
  results = {"methods": {}, "skipped_rows": {name: sum(len(r.skipped) for r in reports)
                                             for name, _, reports in sets},
             "complete": False, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  limit, _ = search.failure_limits(config.engine)
  by_method: dict[str, list[dict]] = {}
  partial_predictions = workdir / PARTIAL["predictions.jsonl"]
  try:
    with open(partial_predictions, "w", encoding="utf-8") as out:
      for method in job.methods:
        records = by_method.setdefault(method, [])
        for name, rows, _ in sets:
          scored = evaluator.run_set(method, rows, name)
          records += scored
          for r in scored:
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
          out.flush()
          if records:
            results["methods"][method] = summarize(records)
          results["skipped_rows"] = _skipped_counts(sets, evaluator.skipped)
          _write_json(workdir / PARTIAL["results.json"], results)
  except BaseException as e:
    done = workdir / "results.json"
    print(f"evaluation stopped ({type(e).__name__}); what it scored is in "
          f"{workdir / PARTIAL['results.json']} and {partial_predictions}. "
          + (f"{done} still holds the last complete run." if done.exists() else
             "No run in this workdir has completed."), file=sys.stderr)
    raise
  _restrict_to_common_rows(results, by_method, evaluator.skipped)
  results["complete"] = True
  results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
  failures = [f"{method} on {name}: {scores['failed_searches']} of the search calls "
              f"({100 * scores['failed_share']:.1f}%) failed"
              for method, sets_ in results["methods"].items() for name, scores in sets_.items()
              if name != "average" and scores.get("failed_share", 0.0) > limit]
  if failures:
    error = evaluator.engine.last_error or "no error recorded"
    results["engine_failures"] = failures + [
        f"(above config.engine.max_failed_share={limit:.0%}; the engine's last error: {error}; "
        "these scores do not measure the policy.)"]
    results["ok"] = False
  markdown = write_tables(results, workdir)
  _write_json(workdir / "results.json", results)
  partial_predictions.replace(workdir / "predictions.jsonl")
  (workdir / PARTIAL["results.json"]).unlink(missing_ok=True)
  if config.progress:
    print(markdown)
  if failures:
    print("evaluation: the search engine failed — " + " ".join(results["engine_failures"]),
          file=sys.stderr)
  return results


def run(config, workdir: str) -> dict:
  return evaluate(setup(config, workdir))


def _skipped_counts(sets, skipped_later: list[dict]) -> dict[str, int]:
  """Rows left out per set: at load (``LoadReport``s) and, once per row whatever
  the method, when a prompt with documents was too wide."""
  counts = {name: sum(len(r.skipped) for r in reports) for name, _, reports in sets}
  for name, row_id in {(s["set"], s["id"]) for s in skipped_later}:
    counts[name] = counts.get(name, 0) + 1
  return counts


def _restrict_to_common_rows(results: dict, by_method: dict, skipped: list[dict]) -> None:
  """Scores over the rows every method answered: a row a method left out (RAG's
  prompt too wide) is left out of the others too, named in ``left_out``."""
  left_out: dict[str, list] = {}
  for s in skipped:
    if s["id"] not in left_out.setdefault(s["set"], []):
      left_out[s["set"]].append(s["id"])
  left_out = {k: v for k, v in left_out.items() if v}
  if not left_out:
    return
  # a set that no method kept a row of stays as it was, named: an empty table would
  # replace the last complete run's with nothing
  rows_of = {(r["set"], r["id"]) for records in by_method.values() for r in records}
  empty = sorted(name for name, ids in left_out.items()
                 if not {key for key in rows_of if key[0] == name} - {(name, i) for i in ids})
  if empty:
    results["not_comparable"] = empty
    left_out = {k: v for k, v in left_out.items() if k not in empty}
    if not left_out:
      return
  results["methods_every_row"] = results["methods"]
  results["left_out"] = left_out
  drop = {(name, i) for name, ids in left_out.items() for i in ids}
  results["methods"] = {}
  for method, records in by_method.items():
    kept = [r for r in records if (r["set"], r["id"]) not in drop]
    if kept:
      results["methods"][method] = summarize(kept)


def _replace(path: Path, write) -> None:
  """``write(temporary path)``, then the temporary file renamed onto ``path``: a
  crash mid-write leaves the previous file whole."""
  partial = path.with_name(path.name + ".tmp")
  write(partial)
  partial.replace(path)


def _write_json(path: Path, results: dict) -> None:
  _replace(path, lambda p: p.write_text(json.dumps(results, indent=2) + "\n"))


__all__ = ["METHODS", "METRICS", "METRIC_TITLES", "Evaluator", "method_prompt", "method_prompts",
           "summarize",
           "write_tables",
           "sample_rows", "load_policy", "parse_sets", "EvalJob", "setup", "evaluate", "run"]
