"""Search-simulation tuning data (METHOD.md §3, §7) and the simulator quality report.

The reference project ships none of this. The pipeline (``job="sim_data"``):

  1. **collect**: run a policy with the template against a *real* engine (BM25
     over a local corpus, or an HTTP engine) on a sample of training questions,
     recording per question every query, the documents it got and whether the
     final answer was right (``trajectories.jsonl``, resumable: questions already
     in the file are skipped). ``queries="question"`` skips the policy and
     searches each question itself (a bootstrap when no searching policy exists);
  2. **label** each (query, documents) pair *useful* (the documents hold enough
     to answer) or *noisy* with a pluggable judge: ``RuleJudge`` (a gold answer
     appears in the documents) or ``LLMJudge`` (a checkpoint and a prompt,
     scored yes vs no); balance the classes by down-sampling the larger one;
  3. **dataset**: simulator prompt (question, first gold answer, query, the
     useful/noisy keyword) -> documents rendered ``Doc 1: …``, saved with
     ``datasets`` (``save_to_disk``, splits ``train`` / ``test`` disjoint in
     questions) for ``zsjax.train_sft``.

``quality_report`` measures what the method relies on: for held-out queries,
how often the simulator's *useful* documents contain the gold answer versus
its *noisy* ones, and the perplexity of the held-out target documents.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import datasets
import ml_collections
from tqdm import tqdm

from zsjax import data as data_lib
from zsjax import hf, rewards, tinyworld, train_sft
from zsjax import sampling as sampling_lib
from zsjax import rollout as rollout_lib
from zsjax.data import write_jsonl
from zsjax.engine import pad_rows
from zsjax.metrics import MetricWriter, drop_torn_tail, read_jsonl
from zsjax.model import token_log_probs
from zsjax.search import HostSearch, SearchRequest, SearchResult, engine_from_config
from zsjax.sharding import ShardingPlan
from zsjax.simulator import SimulatorEngine, SimulatorPrompt, policy_query, simulator_sampling
from zsjax.stages import Stage, StageRun, run_stage
from zsjax.template import build_tag_matcher, render_documents, render_prompt
from zsjax.train_sft import packed_split
from zsjax.train_step import next_token_loss


class RecordingEngine:
  """A host engine that remembers every request and the documents it returned."""

  def __init__(self, engine):
    self.engine = engine
    self.top_k = engine.top_k
    self.records: list[tuple[SearchRequest, list[str]]] = []

  def search(self, requests: Sequence[SearchRequest]) -> SearchResult:
    result = self.engine.search(requests)
    self.records.extend(zip(requests, result.documents))
    return result


# ----------------------------------------------------------------- collection


def _done_ids(path: Path) -> set[str]:
  """Ids already collected (a line cut off by a kill is dropped: it is collected again)."""
  drop_torn_tail(path)
  return {r["id"] for r in read_jsonl(path)} if path.exists() else set()


def collect_trajectories(path: str | Path, examples, engine, *, tokenizer=None, policy=None,
                         batch_size: int = 8, queries: str = "policy",
                         progress: bool = True) -> dict:
  """Appends one JSON line per question to ``path`` (skipping ids already there):
  ``{id, question, golden_answers, searches: [{query, documents}], answer,
  correct, f1}``.

  ``policy``: the dict ``make_collection_policy`` returns (a jitted rollout on a
  ``HostSearch`` around ``RecordingEngine(engine)``, its params, static tokens and
  prompt width). ``queries="question"`` searches each question
  instead. Returns counts."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  done = _done_ids(path)
  todo = [e for e in examples if e["id"] not in done]
  counts = {"questions": len(todo), "skipped_done": len(done), "searches": 0}
  if queries not in ("policy", "question"):
    raise ValueError(f"queries={queries!r} is not 'policy' or 'question'.")
  with open(path, "a", encoding="utf-8") as out, tqdm(total=len(todo), desc="collect",
                                                     disable=not progress) as bar:
    for start in range(0, len(todo), batch_size):
      chunk = todo[start:start + batch_size]
      if queries == "question":
        result = engine.search([SearchRequest(e["question"]) for e in chunk])
        records = [{"searches": [{"query": e["question"], "documents": docs}], "answer": None}
                   for e, docs in zip(chunk, result.documents)]
      else:
        records = _policy_chunk(chunk, policy, tokenizer, batch_size)
      for e, record in zip(chunk, records):
        golds = list(e["golden_answers"])
        row = {"id": e["id"], "question": e["question"], "golden_answers": golds, **record,
               "correct": rewards.exact_match(record["answer"], golds),
               "f1": rewards.f1(record["answer"], golds)}
        counts["searches"] += len(row["searches"])
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
      out.flush()
      bar.update(len(chunk))
  return counts


def make_collection_policy(policy_cfg, policy_params, tokenizer, engine, rollout_config,
                           sampling, *, prompt_width: int, chat_template: bool = False):
  """The ``policy`` tuple of ``collect_trajectories``: a jitted rollout on a host
  engine that records every search. ``chat_template``: the prompts in the
  tokenizer's chat template (an instruct collector, the paper's Qwen2.5-7B-Instruct)."""
  static = rollout_lib.prepare_static_tokens(tokenizer, vocab_size=policy_cfg.vocab_size,
                                             eos_ids=hf.end_tokens(policy_cfg, tokenizer))
  recorder = RecordingEngine(engine)
  search = HostSearch(recorder, tokenizer, rollout_config.max_obs_tokens, pad_id=static.pad_id)
  matcher = build_tag_matcher(tokenizer, vocab_size=policy_cfg.vocab_size)
  rollout = jax.jit(rollout_lib.make_rollout(policy_cfg, matcher, static, search, rollout_config,
                                             sampling))
  return {"rollout": rollout, "params": policy_params, "static": static, "search": search,
          "recorder": recorder, "prompt_width": prompt_width, "chat_template": chat_template}


def _policy_chunk(chunk, policy, tokenizer, batch_size):
  if policy is None or tokenizer is None:
    raise ValueError("queries='policy' needs policy= (make_collection_policy) and tokenizer=.")
  questions = [e["question"] for e in chunk]
  padded = questions + [questions[-1]] * (batch_size - len(chunk))  # one shape, one compile
  answers = [list(e["golden_answers"])[0] for e in chunk]
  answers += [answers[-1]] * (batch_size - len(chunk))
  prompts = [render_prompt(q, tokenizer, use_chat_template=policy.get("chat_template", False))
             for q in padded]
  batch = rollout_lib.prepare_batch(tokenizer, prompts, padded, answers, policy["search"],
                                    pad_id=policy["static"].pad_id,
                                    prompt_width=policy["prompt_width"])
  recorder = policy["recorder"]
  recorder.records.clear()
  traj = jax.device_get(policy["rollout"](policy["params"], jnp.zeros((), jnp.int32), batch,
                                          jax.random.key(0), 0))
  traj = jax.tree_util.tree_map(np.asarray, traj)
  scores = rewards.score_answers(tokenizer, traj, [list(e["golden_answers"]) for e in chunk] +
                         [["-"]] * (batch_size - len(chunk)), "f1")
  by_row: dict[int, list[dict]] = {}
  for request, docs in recorder.records:
    by_row.setdefault(request.row, []).append({"query": request.query.strip(),
                                               "documents": list(docs)})
  return [{"searches": by_row.get(i, []), "answer": scores.answers[i]}
          for i in range(len(chunk))]


# ------------------------------------------------------------------ labelling


class Judge(Protocol):
  def useful(self, question: str, golds: Sequence[str], query: str,
             documents: Sequence[str]) -> bool: ...


class RuleJudge:
  """Useful iff a (normalised) gold answer appears in the (normalised) documents."""

  def useful(self, question, golds, query, documents) -> bool:
    text = rewards.normalize_answer(" ".join(documents))
    return any(rewards.normalize_answer(g) and f" {rewards.normalize_answer(g)} " in f" {text} "
               for g in golds)


DEFAULT_JUDGE_PROMPT = (
    "Question: {question}\nCorrect answer: {answer}\nSearch query: {query}\n"
    "Documents:\n{documents}\n"
    "Do these documents contain enough information to answer the question correctly? "
    "Reply yes or no.\nReply:")


@dataclasses.dataclass
class LLMJudge:
  """An LLM judge from a checkpoint: useful iff log p(" yes") > log p(" no") after
  the prompt (teacher-forced, so deterministic). ``chat_template``: an instruct
  judge reads the prompt as a user message in its chat template (with the
  generation prompt) and answers "yes" / "no" as the assistant's first word."""

  cfg: object
  params: object
  tokenizer: object
  prompt: str = DEFAULT_JUDGE_PROMPT
  max_prompt_tokens: int = 1024
  chat_template: bool = False

  def __post_init__(self):
    self._scores = jax.jit(lambda p, t, s: token_log_probs(self.cfg, p, t, s))

  def _logp(self, prompt_ids, answer_ids) -> float:
    ids = (prompt_ids + answer_ids)[-self.max_prompt_tokens:]
    width = 1 << max(len(ids) - 1, 1).bit_length()  # few shapes, few compiles
    tokens = np.zeros((1, width), np.int32)
    segment = np.zeros((1, width), np.int32)
    tokens[0, :len(ids)], segment[0, :len(ids)] = ids, 1
    logp = np.asarray(self._scores(self.params, jnp.asarray(tokens), jnp.asarray(segment)))
    return float(logp[0, len(ids) - len(answer_ids):len(ids)].sum())

  def useful(self, question, golds, query, documents) -> bool:
    text = self.prompt.format(question=question, answer=golds[0], query=query,
                              documents=render_documents(documents))
    space = " "
    if self.chat_template:
      text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                tokenize=False, add_generation_prompt=True)
      space = ""
    ids = self.tokenizer.encode(text, add_special_tokens=False)
    yes = self._logp(ids, self.tokenizer.encode(space + "yes", add_special_tokens=False))
    no = self._logp(ids, self.tokenizer.encode(space + "no", add_special_tokens=False))
    return yes > no


def label_pairs(trajectories: Sequence[dict], judge: Judge) -> list[dict]:
  """One row per search that returned documents: question, golds, query,
  documents and ``label`` (``useful`` | ``noisy``)."""
  pairs = []
  for t in trajectories:
    for s in t["searches"]:
      if not s["documents"] or not s["query"].strip():
        continue
      useful = judge.useful(t["question"], t["golden_answers"], s["query"], s["documents"])
      pairs.append({"id": t["id"], "question": t["question"], "golden_answers": t["golden_answers"],
                    "query": s["query"], "documents": s["documents"],
                    "label": "useful" if useful else "noisy"})
  return pairs


def balance(pairs: Sequence[dict], seed: int) -> list[dict]:
  """Down-samples the larger class to the size of the smaller (seeded), keeping order."""
  by_label = {"useful": [i for i, p in enumerate(pairs) if p["label"] == "useful"],
              "noisy": [i for i, p in enumerate(pairs) if p["label"] == "noisy"]}
  keep = min(len(v) for v in by_label.values())
  rng = np.random.default_rng(seed)
  chosen = set()
  for indices in by_label.values():
    chosen.update(rng.choice(indices, size=keep, replace=False).tolist() if keep else [])
  return [p for i, p in enumerate(pairs) if i in chosen]


def label_counts(pairs: Sequence[dict]) -> dict[str, int]:
  return {label: sum(p["label"] == label for p in pairs) for label in ("useful", "noisy")}


# -------------------------------------------------------------------- dataset


def sft_rows(pairs: Sequence[dict], sim_prompt: SimulatorPrompt, tokenizer=None) -> list[dict]:
  """The simulator's supervised examples: prompt with the pair's label -> documents
  (``tokenizer``: the simulator's, for a chat prompt)."""
  rows = []
  for p in pairs:
    docs = list(p["documents"])[:sim_prompt.top_k]
    rows.append({"prompt": sim_prompt.render(p["query"], p["question"], p["golden_answers"][0],
                                             noisy=p["label"] == "noisy", tokenizer=tokenizer),
                 "target": render_documents(docs), "label": p["label"], "query": p["query"],
                 "question": p["question"], "golden_answers": list(p["golden_answers"])})
  return rows


def save_sft_dataset(rows: Sequence[dict], directory: str | Path, *, test_fraction: float,
                     seed: int):
  """Splits rows into train / test by question (no question in both) and saves a
  ``datasets.DatasetDict``; returns it."""
  questions = sorted({r["question"] for r in rows})
  order = np.random.default_rng(seed).permutation(len(questions))
  n_test = int(round(test_fraction * len(questions)))
  if test_fraction > 0 and len(questions) > 1:
    n_test = min(max(n_test, 1), len(questions) - 1)
  test_questions = {questions[i] for i in order[:n_test]}
  splits = {"train": [dict(r, split="train") for r in rows if r["question"] not in test_questions],
            "test": [dict(r, split="test") for r in rows if r["question"] in test_questions]}
  dataset = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()
                                  if v})
  dataset.save_to_disk(str(directory))
  return dataset


# --------------------------------------------------------------- quality report


def simulated_documents(sim_cfg, sim_params, tokenizer, rows: Sequence[dict], *,
                        sim_prompt: SimulatorPrompt = SimulatorPrompt(),
                        max_new_tokens: int = 128, max_query_tokens: int = 32,
                        batch_size: int = 8, seed: int = 0, temperature: float = 0.0,
                        sampling_method: str = "gumbel") -> dict[str, list[str]]:
  """The documents the on-device simulator engine (the one RL uses) writes for
  each row's ``query`` (rendered as RL's policy writes it), with the row's
  ``question`` and first gold answer in its prompt: ``{"useful": [text per
  row], "noisy": [text per row]}``. Greedy at ``temperature`` 0, else sampled
  (``simulator.simulator_sampling``)."""
  static = rollout_lib.prepare_static_tokens(tokenizer, vocab_size=sim_cfg.vocab_size,
                                             eos_ids=hf.end_tokens(sim_cfg, tokenizer))
  prefix_width = max(len(tokenizer.encode(sim_prompt.split(r["question"], r["golden_answers"][0],
                                                           noisy, tokenizer)[0],
                                          add_special_tokens=False))
                     for r in rows for noisy in (False, True))
  engine = SimulatorEngine(
      cfg=sim_cfg, tokenizer=tokenizer, prompt=sim_prompt, piece_bytes=static.piece_bytes,
      max_new_tokens=max_new_tokens, prefix_width=prefix_width, query_width=max_query_tokens,
      sampling=simulator_sampling(temperature, sampling_method),
      eos_ids=static.eos_ids, pad_id=static.pad_id)
  generate = jax.jit(engine)
  texts = {"useful": [], "noisy": []}
  for start in range(0, len(rows), batch_size):
    chunk = list(rows[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)
    inputs = engine.inputs([r["question"] for r in chunk], [r["golden_answers"][0] for r in chunk])
    query, lengths = pad_rows([tokenizer.encode(policy_query(r["query"]),  # as RL's policy
                                                add_special_tokens=False) for r in chunk],
                              max_query_tokens, static.pad_id)
    for mode in ("useful", "noisy"):
      noisy = jnp.full((batch_size,), mode == "noisy")
      out = jax.device_get(generate(sim_params, inputs, jnp.asarray(query), jnp.asarray(lengths),
                                    jnp.ones((batch_size,), bool), noisy,
                                    jax.random.fold_in(jax.random.key(seed), start)))
      for i in range(n):
        texts[mode].append(tokenizer.decode(np.asarray(out.tokens[i, :out.lengths[i]]).tolist(),
                                            skip_special_tokens=True))
  return texts


def quality_report(sim_cfg, sim_params, tokenizer, rows: Sequence[dict], *,
                   sim_prompt: SimulatorPrompt = SimulatorPrompt(), max_new_tokens: int = 128,
                   max_query_tokens: int = 32, batch_size: int = 8, seed: int = 0,
                   temperature: float = 0.0) -> dict:
  """Generates documents for each held-out row in *useful* and in *noisy* mode
  (``simulated_documents``) and reports how often they contain a gold answer,
  plus the target perplexity of the rows' own documents under their own label.
  Returns a dict; ``format_report`` prints it."""
  if not rows:
    raise ValueError("quality_report: no held-out rows (is the dataset's test split empty?).")
  texts = simulated_documents(sim_cfg, sim_params, tokenizer, rows, sim_prompt=sim_prompt,
                              max_new_tokens=max_new_tokens, max_query_tokens=max_query_tokens,
                              batch_size=batch_size, seed=seed, temperature=temperature)
  contains = {mode: [RuleJudge().useful("", r["golden_answers"], "", [text])
                     for r, text in zip(rows, texts[mode])] for mode in texts}
  static = rollout_lib.prepare_static_tokens(tokenizer, vocab_size=sim_cfg.vocab_size)
  eos = tokenizer.eos_token_id
  packed, info = packed_split(tokenizer, rows, 4096, eos, static.pad_id, "quality_report")
  loss, _ = jax.jit(lambda p, b: next_token_loss(sim_cfg, p, b))(
      sim_params, {k: jnp.asarray(v) for k, v in packed.items()})
  report = {"rows": len(rows),
            "useful/contains_answer": float(np.mean(contains["useful"])),
            "noisy/contains_answer": float(np.mean(contains["noisy"])),
            "target/nll": float(loss), "target/perplexity": float(np.exp(float(loss))),
            "target/tokens": info["target_tokens"]}
  report["controllability_gap"] = report["useful/contains_answer"] - report["noisy/contains_answer"]
  return report


def format_report(report: dict) -> str:
  lines = ["| simulator mode | held-out queries | documents contain the gold answer |",
           "|---|---|---|",
           f"| useful | {report['rows']} | {report['useful/contains_answer']:.1%} |",
           f"| noisy | {report['rows']} | {report['noisy/contains_answer']:.1%} |",
           "",
           f"controllability gap (useful - noisy): {report['controllability_gap']:+.1%}; "
           f"target perplexity {report['target/perplexity']:.2f} over "
           f"{report['target/tokens']} tokens"]
  return "\n".join(lines)


# ----------------------------------------------------------------- the job


def report_rows(rows: list[dict], queries: str) -> list[dict]:
  """The held-out pairs the quality report scores: ``queries="all"``, or
  ``"question"`` for searches of the question itself only (there useful documents
  should hold the gold answer and noisy ones should not; a query about something
  else should not hold it in either mode)."""
  if queries == "all":
    return list(rows)
  if queries == "question":
    return [r for r in rows if r["query"].strip() == r["question"].strip()]
  raise ValueError(f"sim_tuning.report_queries={queries!r} is not 'all' or 'question'.")


def _collect(run) -> None:
  """Trajectories against the real engine (resumable question by question)."""
  config, c, tokenizer = run.config, run.config.sim_tuning, run.shared["tokenizer"]
  examples = data_lib.load_qa(config.data.train_files, on_error=config.data.on_error)
  if c.num_questions and c.num_questions < len(examples):
    order = np.random.default_rng(config.seed).permutation(len(examples))[:c.num_questions]
    examples = examples.select(sorted(order.tolist()))
  engine = engine_from_config(config.engine, run.shared["sim_prompt"])  # a real engine
  policy = None
  if c.queries == "policy":
    plan = ShardingPlan.single_device()
    cfg, params = hf.load_model(c.policy, plan, jax.random.key(config.seed), len(tokenizer),
                             (tokenizer.eos_token_id,), what="sim_tuning.policy")
    policy = make_collection_policy(cfg, params, tokenizer, engine,
                                    rollout_lib.RolloutConfig.from_config(c.rollout),
                                    sampling_lib.from_config(c.sampling), prompt_width=c.prompt_width,
                                    chat_template=c.policy_chat_template)
  run.shared["summary"]["collect"] = collect_trajectories(
      run.workdir / "trajectories.jsonl", examples, engine, tokenizer=tokenizer, policy=policy,
      batch_size=c.batch_size, queries=c.queries, progress=config.progress)


def _label(run) -> None:
  config, c = run.config, run.config.sim_tuning
  if c.judge == "rule":
    judge = RuleJudge()
  elif c.judge == "llm":
    judge_cfg, judge_params = hf.load_checkpoint(c.judge_checkpoint)
    judge = LLMJudge(judge_cfg, judge_params, hf.load_tokenizer(c.judge_checkpoint),
                     c.judge_prompt or DEFAULT_JUDGE_PROMPT, chat_template=c.judge_chat_template)
  else:
    raise ValueError(f"config.sim_tuning.judge={c.judge!r} is not 'rule' or 'llm'.")
  trajectories = run.workdir / "trajectories.jsonl"
  pairs = label_pairs(read_jsonl(trajectories), judge)
  kept = balance(pairs, config.seed) if c.balance else pairs
  labels = {"before_balance": label_counts(pairs), "after_balance": label_counts(kept)}
  run.shared["summary"]["labels"] = labels
  if not kept:
    raise ValueError(f"no labelled pairs of both classes from {trajectories} "
                     f"({label_counts(pairs)}); collect more questions "
                     "(config.sim_tuning.num_questions) or use another judge.")
  write_jsonl(run.workdir / "pairs.jsonl", kept)
  (run.workdir / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")


def _dataset(run) -> None:
  save_sft_dataset(sft_rows(read_jsonl(run.workdir / "pairs.jsonl"), run.shared["sim_prompt"],
                            run.shared["tokenizer"]),
                   run.workdir / "sft_data", test_fraction=run.config.sim_tuning.test_fraction,
                   seed=run.config.seed)


def _sft(run) -> None:
  sft_config = ml_collections.ConfigDict(run.config.to_dict())
  sft_config.sft.data = str(run.workdir / "sft_data")
  train_sft.run(sft_config, str(run.workdir / "sft"))


def _report(run) -> None:
  config, c, workdir = run.config, run.config.sim_tuning, run.workdir
  sim_cfg, sim_params = hf.load_checkpoint(workdir / "sft" / "hf_export")
  test = datasets.load_from_disk(str(workdir / "sft_data")).get("test")
  rows = report_rows(list(test) if test is not None else [], c.report_queries)
  report = quality_report(sim_cfg, sim_params, run.shared["tokenizer"],
                          rows[:c.report_rows or None], sim_prompt=run.shared["sim_prompt"],
                          max_new_tokens=c.report_new_tokens, seed=config.seed)
  (workdir / "sim_report.json").write_text(json.dumps(report, indent=2) + "\n")
  (workdir / "sim_report.md").write_text(format_report(report) + "\n")
  with MetricWriter(workdir / "report_metrics") as writer:
    writer.write(0, {f"sim_report/{k}": v for k, v in report.items()})


def run(config, workdir: str) -> dict:
  """``job="sim_tuning"``: collect -> label -> dataset -> SFT -> quality report, each
  stage skipped when its output exists in WORKDIR (``zsjax.stages``), so a rerun
  resumes. Collection always runs: it skips the questions already collected."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  report_rows([], config.sim_tuning.report_queries)  # a bad value fails now, not after tuning
  config = tinyworld.fill_missing_data(config, workdir, "data", "train_files",
                                       lambda world: world["train"])
  summary: dict = {}
  state = StageRun(config, workdir, "sim_tuning", shared={
      "summary": summary, "tokenizer": hf.config_tokenizer(config, "model"),
      "sim_prompt": SimulatorPrompt.from_config(config.simulator_template, config.engine.top_k,
                                                config.simulator_chat_template)})
  _collect(state)
  for stage in (Stage("label", "pairs.jsonl", _label), Stage("dataset", "sft_data", _dataset),
                Stage("sft", "sft/sft_summary.json", _sft),
                Stage("report", "sim_report.json", _report)):
    run_stage(state, stage)
  summary["sft"] = json.loads((workdir / "sft" / "sft_summary.json").read_text())
  summary["report"] = json.loads((workdir / "sim_report.json").read_text())
  if config.progress:
    print(format_report(summary["report"]))
  (workdir / "sim_tuning.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


__all__ = ["run", "RecordingEngine", "collect_trajectories", "make_collection_policy", "RuleJudge",
           "LLMJudge", "DEFAULT_JUDGE_PROMPT", "label_pairs", "balance", "label_counts",
           "sft_rows", "save_sft_dataset", "simulated_documents", "quality_report", "format_report",
           "report_rows"]
