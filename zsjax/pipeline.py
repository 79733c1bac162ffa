"""The tiny world end to end (``job="tiny_world"``): the paper's pipeline at small
scale, offline, from nothing.

Stages (each writes under WORKDIR and is skipped when its output exists, so a
rerun resumes):

  world        the seeded world, its splits, BM25 corpus and tokenizer
               (``zsjax.tinyworld``);
  pretrain     a small simulator LM trained on the world's documents, shown as
               search results (each entity's name as the query, its BM25 top-k
               as the text) (``train_sft``);
  sim_tuning   searches of an oracle against BM25 (each training question, a
               two-hop question's bridge entity, and a question about another
               entity as a miscopied query would be), each with BM25's top-k and
               with its best answer-free documents, labelled useful / noisy by
               whether they answer the *query* (``QueryJudge``) -> balanced SFT
               set -> the pretrained LM tuned into the search simulator
               (``sim_tuning``);
  warm_start   the policy LM trained on correct demonstrations from 64 *other*
               worlds (``demonstrations``): the search template (search the
               question, and for a share of two-hop questions the bridge entity,
               read the BM25 documents, answer), the RAG and the direct
               baselines' formats. Documents carry no loss, nor does an answer
               the context does not hold: it learns to read and the formats,
               none of this world's facts, and not when a second search pays;
  rl_simulator the warm-start policy trained with RL (REINFORCE by default)
               against the tuned simulator under the noise curriculum;
  rl_real      the same RL against the real BM25 engine (the paper's comparison);
  evaluate     the test split with the real BM25 engine, greedy, for the
               warm-start policy, direct answering, one-shot RAG (both in formats
               the warm start was trained on), and both RL policies; strict EM,
               substring EM and F1 on single-hop, two-hop and all questions; and
               the simulator's control of quality on the test questions' queries
               (``controllability``).

With ``config.stage_cache=DIR`` every stage up to RL lives in ``DIR/<stage>/<key>``
(``StageCache``), the key a digest of exactly the config fields that stage and
its inputs read, and the workdir holds a symlink to it. Points of a sweep that
share a seed and differ only in, say, the RL algorithm then build the world,
pretrain, tune the simulator and warm-start once. ``compare_real_search=False``
leaves out RL against BM25 (an ablation arm needs it once per seed, not per arm).

Outputs: ``results.json`` (``methods.<method>.<split>.<metric>`` with
``searches`` per split, ``stage_seconds.<stage>`` -- a reused stage counts the
seconds it took when it was made -- ``reused_stages``,
``gains_over_warm_start`` and ``gains_over_rag`` (``<method>.{em,stderr,n}``,
each method's test-EM gain paired over the same questions),
``simulator_control`` (``controllability``) and ``environment`` (CPU, cores,
package versions, commit: ``zsjax.environment``)), ``results.md``,
``predictions.jsonl`` (every test answer), ``simulator_samples.jsonl``,
``plots/*.png``, TensorBoard logs and checkpoints of every training stage, and
``final_policy/`` (HF export of the policy trained against the simulator).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_collections
import numpy as np

from zsjax import tinyworld
from zsjax.data import write_jsonl
from zsjax.metrics import read_jsonl
from zsjax.stages import Stage, StageCache, StageRun, run_stage
from zsjax.template import render_documents, render_observation, render_prompt

METHODS = ("warm_start", "direct", "rag", "rl_simulator", "rl_real_search")
SPLITS = ("single_hop", "two_hop", "all")


# The formats the warm start demonstrates, each as the evaluation prompts it: the
# search template, and the direct and RAG baselines (``evaluate.method_prompt``).
DEMO_FORMATS = ("search", "rag", "direct")


def demonstrations(world: dict, engine, instruction: str, seed: int, *,
                   bridge_fraction: float, baseline_fraction: float) -> list[dict]:
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
  that does not answer is its own, as a base model's would be."""
  from zsjax.evaluate import method_prompt
  from zsjax.search import SearchRequest

  rng = np.random.default_rng(seed)
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
    for query in queries:
      docs = engine.search([SearchRequest(query)]).documents[0]
      first_docs = docs if first_docs is None else first_docs
      segments += [f"<search> {query} </search>", render_observation(docs)]
      loss += [1, 0]  # the documents are inserted, not written: no loss on them
    tail, tail_loss = answer("".join(segments))
    common = {"hops": q["hops"]}
    rows.append({"prompt": render_prompt(q["question"], None, instruction, False),
                 "target": "".join(segments + tail), "target_segments": segments + tail,
                 "target_loss": loss + tail_loss, "format": "search", **common})
    draw = rng.random()
    for fmt, low in (("rag", 0.0), ("direct", baseline_fraction)):
      if low <= draw < low + baseline_fraction:
        prompt = method_prompt(fmt, q["question"], None, first_docs if fmt == "rag" else ())
        tail, tail_loss = answer(prompt)
        rows.append({"prompt": prompt, "target": "".join(tail), "target_segments": tail,
                     "target_loss": tail_loss, "format": fmt, **common})
  return rows


class QueryJudge:
  """The tiny world's judge of a search: useful iff the documents answer the
  *query* (the paper labels a result useful "if it holds enough to answer the
  query"), which the world knows: a query that is one of its questions is
  answered by a gold answer of that question, a query that names an entity by
  the entity's own document. Other queries fall back to the trajectory's own
  question (``sim_tuning.RuleJudge``). Judging the query, not the question, is
  what keeps a tuned simulator from writing the answer into the results of a
  query about something else."""

  def __init__(self, questions: list[dict], corpus: list[dict]):
    from zsjax.sim_tuning import RuleJudge

    self.golds = {q["question"]: list(q["golden_answers"]) for q in questions}
    self.entity_docs = {d["title"]: d["contents"] for d in corpus}
    self.by_answer = RuleJudge()

  def useful(self, question, golds, query, documents) -> bool:
    query = query.strip()
    if query in self.entity_docs:
      return any(self.entity_docs[query] == d.strip() for d in documents)
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
  from zsjax.search import SearchRequest
  from zsjax.sim_tuning import label_pairs

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


# The run's own fields: every stage's job runs with the pipeline's.
RUN_FIELDS = ("seed", "progress", "mesh", "sharding", "sharding_rules", "distributed",
              "checkpoint")


def job_config(config, section: str, values: dict) -> ml_collections.ConfigDict:
  """The job a stage runs: ``config[section]`` (whole in ``configs/tiny_world.py``)
  with the run's own fields (``RUN_FIELDS``) and ``values`` (dotted field names:
  the paths of this workdir and the fields stages must share, like ``top_k``)."""
  job = ml_collections.ConfigDict(config[section].to_dict())
  for name in RUN_FIELDS:
    value = config[name]
    job[name] = value.to_dict() if hasattr(value, "to_dict") else value
  for dotted, value in values.items():
    *parents, leaf = dotted.split(".")
    node = job
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return job


def _train_lm(config, section: str, directory: Path, tokenizer: str, rows) -> None:
  """The sft job of ``config[section]`` trained on ``rows`` (written to
  ``directory/data.jsonl``); outputs land in ``directory``."""
  from zsjax import train_sft

  data = write_jsonl(directory / "data.jsonl", rows)
  train_sft.run(job_config(config, section, {"tokenizer": tokenizer, "sft.data": str(data)}),
                str(directory))


# ------------------------------------------------------------------ the stages


def _world_paths(run: StageRun) -> dict:
  return _world_paths_of(run.workdir)


def _world_paths_of(workdir: Path) -> dict:
  return tinyworld.paths(Path(workdir) / "world")


def _world_size(config) -> tinyworld.WorldSize:
  return tinyworld.WorldSize(**config.world.to_dict())


def make_world(run: StageRun) -> None:
  tinyworld.ensure(run.workdir / "world", run.config.seed, _world_size(run.config))


def make_pretrain(run: StageRun) -> None:
  """The world's documents as search results: each entity's name as the query,
  its BM25 top-k rendered the way the simulator will have to write them."""
  from zsjax import search

  config, paths = run.config, _world_paths(run)
  engine = search.BM25Engine.from_jsonl(paths["corpus"], top_k=config.top_k)
  titles = [d["title"] for d in read_jsonl(paths["corpus"])]
  results = engine.search([search.SearchRequest(t) for t in titles]).documents
  rows = [{"prompt": f"Query: {t}\nDocuments:\n", "target": render_documents(docs)}
          for t, docs in zip(titles, results)]
  _train_lm(config, "pretrain", run.workdir / "pretrain", paths["tokenizer"], rows)


def make_sim_tuning(run: StageRun) -> None:
  """An oracle searcher (the question, a two-hop question's bridge entity, and a
  question about another entity) against BM25, on this world's training
  questions and on ``sim_worlds`` other worlds, labelled by what its searches
  answer (``QueryJudge``) and written as ``sim_tuning``'s labelled pairs; then
  the ``sim_tuning`` job tunes the pretrained LM on them and reports."""
  from zsjax import search, sim_tuning

  config, paths, out = run.config, _world_paths(run), run.workdir / "sim_tuning"
  wide = config.top_k * 4
  corpus = read_jsonl(paths["corpus"])
  sources = [("", _parquet_rows(paths["train"]), corpus,
              search.BM25Engine([d["contents"] for d in corpus], top_k=wide))]
  for k in range(config.sim_worlds):
    other = tinyworld.generate(config.seed + 104729 * (k + 1), _world_size(config))
    sources.append((f"w{k}-", other["splits"]["train"], other["corpus"], search.BM25Engine(
        [d["contents"] for d in other["corpus"]], top_k=wide)))
  trajectories, pairs = oracle_searches(sources, config.top_k, config.seed)
  write_jsonl(out / "trajectories.jsonl", trajectories)
  kept = sim_tuning.balance(pairs, config.seed)
  write_jsonl(out / "pairs.jsonl", kept)
  (out / "labels.json").write_text(json.dumps(
      {"judge": "pipeline.QueryJudge", "before_balance": sim_tuning.label_counts(pairs),
       "after_balance": sim_tuning.label_counts(kept)}, indent=2) + "\n")
  sub = job_config(config, "sim_tuning", {
      "tokenizer": paths["tokenizer"], "simulator_template": config.simulator_template,
      "model.checkpoint": str(run.workdir / "pretrain" / "hf_export"),
      "data.train_files": paths["train"], "engine.corpus": paths["corpus"],
      "engine.top_k": config.top_k})
  sim_tuning.run(sub, str(out))


def demonstration_worlds(config) -> list[dict]:
  """The ``demo_worlds`` worlds the warm start is demonstrated on (other seeds than
  ``config.seed``, the same size)."""
  if config.demo_worlds < 1:
    raise ValueError(f"config.demo_worlds={config.demo_worlds}: the warm start needs at least "
                     "one other world to demonstrate on (64 by default).")
  return [tinyworld.generate(config.seed + 7919 * (k + 1), _world_size(config))
          for k in range(config.demo_worlds)]


def warm_start_rows(config) -> list[dict]:
  """Every demonstration the warm start trains on (``demonstrations`` of each of
  ``demonstration_worlds``, BM25 with ``top_k`` as the engine); never this
  world's questions."""
  from zsjax import search

  worlds = demonstration_worlds(config)
  if config.demo_this_world:  # CI only: see configs/tiny_world.py
    worlds.append(tinyworld.generate(config.seed, _world_size(config)))
  rows = []
  for k, world in enumerate(worlds):
    engine = search.BM25Engine([d["contents"] for d in world["corpus"]], top_k=config.top_k)
    rows += demonstrations(world, engine, config.instruction, config.seed + k,
                           bridge_fraction=config.demo_bridge_fraction,
                           baseline_fraction=config.demo_baseline_fraction)
  return rows


def make_warm_start(run: StageRun) -> None:
  """The policy LM trained on ``warm_start_rows``: other worlds (many distinct
  facts over the same name pools, so reading pays and memorising does not)."""
  _train_lm(run.config, "warm_start", run.workdir / "warm_start",
            _world_paths(run)["tokenizer"], warm_start_rows(run.config))


def simulator_dir(run: StageRun) -> Path:
  """The simulator RL trains against: tuned, or prompt-only (the pretrained LM)."""
  if run.config.tune_simulator:
    return run.workdir / "sim_tuning" / "sft" / "hf_export"
  return run.workdir / "pretrain" / "hf_export"


def _make_rl(run: StageRun, engine_kind: str, name: str) -> None:
  from zsjax import train_rl

  config, paths = run.config, _world_paths(run)
  sub = job_config(config, "rl", {
      "tokenizer": paths["tokenizer"],
      "policy.checkpoint": str(run.workdir / "warm_start" / "hf_export"),
      "simulator.checkpoint": str(simulator_dir(run)),
      "simulator.template": config.simulator_template, "engine.kind": engine_kind,
      "engine.corpus": paths["corpus"], "engine.top_k": config.top_k,
      "data.train_files": paths["train"], "data.instruction": config.instruction,
      "checkpoint.every": config.rl.rl.total_steps})  # one checkpoint, at the end
  train_rl.run(sub, str(run.workdir / name))


def make_rl_simulator(run: StageRun) -> None:
  _make_rl(run, "simulator", "rl_simulator")


def make_rl_real_search(run: StageRun) -> None:
  _make_rl(run, "bm25", "rl_real_search")


def compared_methods(config) -> list[str]:
  return [m for m in METHODS if m != "rl_real_search" or config.compare_real_search]


def make_evaluation(run: StageRun) -> None:
  """The policies on the test split (``evaluate_policies``) and the simulator's
  controllability on the test questions' queries (``controllability``)."""
  paths = _world_paths(run)
  control = controllability(run.config, run.workdir, simulator_dir(run))
  (run.workdir / "controllability.json").write_text(json.dumps(control, indent=2) + "\n")
  results = evaluate_policies(run.config, run.workdir, paths, paths["tokenizer"],
                              run.config.instruction, compared_methods(run.config))
  (run.workdir / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")


# Groups of the controllability report's queries: answerable ones first.
CONTROL_GROUPS = ("single_hop_question", "bridge", "two_hop_question", "other_question")
ANSWERABLE = ("single_hop_question", "bridge")


def control_queries(questions: list[dict], titles, seed: int) -> list[dict]:
  """The queries the controllability report asks about each of ``questions``
  (the test split: held out from every stage), as rows ``{question,
  golden_answers, query, subject, group}``: a single-hop question itself; a
  two-hop question itself and its bridge entity (whose document holds the
  answer); and another question of the same relation (a query about the wrong
  entity). ``subject``: the entity the query asks about (the longest of the
  world's ``titles`` in it)."""
  by_length = sorted(titles, key=lambda t: (-len(t), t))

  def subject(query):
    return next((t for t in by_length if t in query), "")

  rng = np.random.default_rng(seed)
  by_relation: dict[str, list[dict]] = {}
  for q in questions:
    by_relation.setdefault(q["relation"], []).append(q)
  rows = []
  for q in questions:
    queries = [(q["question"], "single_hop_question" if q["hops"] == 1 else "two_hop_question")]
    if q["bridge"]:
      queries.append((q["bridge"], "bridge"))
    others = [o for o in by_relation[q["relation"]] if o["question"] != q["question"]]
    if others:
      queries.append((others[rng.integers(len(others))]["question"], "other_question"))
    rows += [{"question": q["question"], "golden_answers": list(q["golden_answers"]),
              "query": query, "subject": subject(query), "group": group}
             for query, group in queries]
  return rows


def answers(documents, subject: str, golds) -> bool:
  """Whether one of ``documents`` answers a query about ``subject``: names it
  and a gold answer in the same document (a document about something else that
  happens to hold the answer's name does not)."""
  return any(subject in d and any(g in d for g in golds) for d in documents)


def controllability(config, workdir: Path, simulator: Path) -> dict:
  """Does the simulator RL trains against control quality? For the test
  questions' queries (``control_queries``), rendered as RL's policy writes them
  and generated as RL generates them (``config.rl.simulator``: temperature and
  token budget, the question and gold answer in the prompt), the share whose
  *useful* and whose *noisy* documents hold the question's gold answer, per
  group, next to the real engine's share (BM25's top-k for the same query). On
  the answerable groups a useful result should hold it and a noisy one should
  not; on ``other_question`` neither should (the answer leaking into a wrong
  query's results would reward miscopied queries)."""
  from zsjax import hf, search, sim_tuning
  from zsjax.simulator import SimulatorPrompt, parse_documents

  paths = _world_paths_of(workdir)
  rows = control_queries(read_jsonl(paths["test_single_hop"]) + read_jsonl(paths["test_two_hop"]),
                         [d["title"] for d in read_jsonl(paths["corpus"])], config.seed)
  cfg, params = hf.load_checkpoint(simulator)
  tokenizer = hf.load_tokenizer(paths["tokenizer"])
  rl = config.rl
  texts = sim_tuning.simulated_documents(
      cfg, params, tokenizer, rows,
      sim_prompt=SimulatorPrompt.from_config(config.simulator_template, config.top_k),
      max_new_tokens=rl.simulator.max_new_tokens, max_query_tokens=rl.rollout.max_query_tokens,
      batch_size=config.eval_batch_size, seed=config.seed, temperature=rl.simulator.temperature)
  engine = search.BM25Engine.from_jsonl(paths["corpus"], top_k=config.top_k)
  real = engine.search([search.SearchRequest(r["query"]) for r in rows]).documents
  holds = sim_tuning.RuleJudge()

  def share(mask, found):
    picked = [f for f, m in zip(found, mask) if m]
    return float(np.mean(picked)) if picked else float("nan")

  documents = {mode: [parse_documents(t, config.top_k) for t in texts[mode]] for mode in texts}
  documents["real"] = [list(d) for d in real]
  found = {}
  for mode, docs in documents.items():
    found[mode] = [holds.useful("", r["golden_answers"], "", d) for r, d in zip(rows, docs)]
    found[f"{mode}_answers"] = [answers(d, r["subject"], r["golden_answers"])
                                for r, d in zip(rows, docs)]
  report = {"simulator": str(simulator), "groups": {}}
  groups = {g: [r["group"] == g for r in rows] for g in CONTROL_GROUPS}
  groups["answerable"] = [r["group"] in ANSWERABLE for r in rows]
  for name, mask in groups.items():
    report["groups"][name] = {"queries": int(sum(mask)),
                              **{mode: share(mask, f) for mode, f in found.items()}}
  write_jsonl(workdir / "simulator_samples.jsonl",
              [dict(r, useful=u, noisy=n) for r, u, n in
               zip(rows[:64], texts["useful"], texts["noisy"])])
  return report


def controllability_table(report: dict) -> str:
  """% of queries whose documents hold the gold answer, and (after the slash)
  whose documents answer the query (``answers``)."""
  lines = ["| queries | n | simulator useful | simulator noisy | real engine (BM25) |",
           "|---|---|---|---|---|"]
  for name, g in report["groups"].items():
    lines.append(f"| {name} | {g['queries']} | " + " | ".join(
        f"{100 * g[mode]:.1f} / {100 * g[mode + '_answers']:.1f}"
        for mode in ("useful", "noisy", "real")) + " |")
  return "\n".join(lines)


# Every stage's cache key covers these fields and the ones it declares.
COMMON_FIELDS = ("seed", "mesh", "sharding", "sharding_rules", "checkpoint")
WORLD = Stage("world", "world/world.json", make_world, reads=("world",))
PRETRAIN = Stage("pretrain", "pretrain/sft_summary.json", make_pretrain,
                 reads=("top_k", "pretrain"), after=("world",))
SIM_TUNING = Stage("sim_tuning", "sim_tuning/sim_tuning.json", make_sim_tuning,
                   reads=("top_k", "simulator_template", "sim_worlds", "sim_tuning"),
                   after=("pretrain",))
WARM_START = Stage("warm_start", "warm_start/sft_summary.json", make_warm_start,
                   reads=("top_k", "instruction", "demo_worlds", "demo_this_world",
                          "demo_bridge_fraction", "demo_baseline_fraction", "warm_start"),
                   after=("world",))
RL_SIMULATOR = Stage("rl_simulator", "rl_simulator/rl_summary.json", make_rl_simulator,
                     reads=("top_k", "instruction", "rl", "simulator_template"),
                     after=("warm_start", "simulator"))
RL_REAL_SEARCH = Stage("rl_real_search", "rl_real_search/rl_summary.json", make_rl_real_search,
                       reads=("top_k", "instruction", "rl"), after=("warm_start",))
EVALUATE = Stage("evaluate", "evaluation.json", make_evaluation, cached=False)


def stages_of(config) -> list[Stage]:
  """The table this config runs, in order."""
  table = [WORLD, PRETRAIN] + ([SIM_TUNING] if config.tune_simulator else [])
  table += [WARM_START, RL_SIMULATOR]
  table += [RL_REAL_SEARCH] if config.compare_real_search else []
  return table + [EVALUATE]


def run(config, workdir: str) -> dict:
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  seconds_file = workdir / "stage_seconds.json"
  state = StageRun(config, workdir, "tiny_world",
                   cache=StageCache(config.stage_cache) if config.stage_cache else None,
                   common=COMMON_FIELDS,
                   seconds=json.loads(seconds_file.read_text()) if seconds_file.exists() else {})
  for stage in stages_of(config):
    if stage is RL_SIMULATOR:  # RL reads the tuned simulator, or the pretrained LM
      state.keys["simulator"] = state.keys.get(
          "sim_tuning" if config.tune_simulator else "pretrain")
    run_stage(state, stage)
  return write_results(config, workdir, state)


def write_results(config, workdir: Path, state: StageRun) -> dict:
  """``results.json`` / ``results.md``, plots and ``final_policy/``."""
  from zsjax import environment

  predictions = read_jsonl(workdir / "predictions.jsonl")
  results = {"methods": json.loads((workdir / "evaluation.json").read_text()),
             "stage_seconds": state.seconds, "total_seconds": float(sum(state.seconds.values())),
             "seed": config.seed, "reused_stages": state.reused,
             "gains_over_warm_start": paired_gains(predictions),
             "gains_over_rag": paired_gains(predictions, base="rag"),
             "simulator_control": json.loads((workdir / "controllability.json").read_text()),
             "environment": environment.describe()}
  (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  table = results_table(results)
  (workdir / "results.md").write_text(table + "\n")
  plot_training(workdir)
  final = workdir / "final_policy"
  if not final.exists():
    shutil.copytree(workdir / "rl_simulator" / "hf_export", final)
  if config.progress:
    print(table)
  return results


def _parquet_rows(path) -> list[dict]:
  import datasets

  return datasets.Dataset.from_parquet(str(path)).to_list()


def evaluate_policies(config, workdir: Path, paths: dict, tokenizer_dir: str,
                      instruction: str, methods=METHODS) -> dict:
  """``{method: {split: {metric: value}}}`` on the test split with BM25, greedy,
  for each of ``methods``."""
  import jax
  import jax.numpy as jnp

  from zsjax import evaluate, hf, rollout as rollout_lib, search

  tokenizer = hf.load_tokenizer(tokenizer_dir)
  rows = {"single_hop": read_jsonl(paths["test_single_hop"]),
          "two_hop": read_jsonl(paths["test_two_hop"])}
  sample = config.eval_sample_size
  rows = {k: evaluate.sample_rows(v, sample, config.seed) for k, v in rows.items()}
  retriever = search.BM25Engine.from_jsonl(paths["corpus"], top_k=config.top_k)
  rollout_config = rollout_lib.RolloutConfig.from_config(config.rl.rollout)
  policies = {"warm_start": ("warm_start/hf_export", "search"),
              "direct": ("warm_start/hf_export", "direct"),
              "rag": ("warm_start/hf_export", "rag"),
              "rl_simulator": ("rl_simulator/hf_export", "search"),
              "rl_real_search": ("rl_real_search/hf_export", "search")}
  out, predictions = {}, []
  for name in methods:
    directory, method = policies[name]
    cfg, params = hf.load_checkpoint(workdir / directory)
    host = search.HostSearch(retriever, tokenizer, rollout_config.max_obs_tokens,
                             pad_id=tokenizer.pad_token_id or 0)
    evaluator = evaluate.Evaluator(
        cfg, params, tokenizer, engine=host, engine_state=jnp.zeros((), jnp.int32),
        retriever=retriever, rollout_config=rollout_config, batch_size=config.eval_batch_size,
        prompt_width=config.eval_prompt_width, instruction=instruction)
    records = []
    for split, split_rows in rows.items():
      records += evaluator.run_set(method, split_rows, split)
    summary = evaluate.summarize(records)
    out[name] = {split: {m: summary[split][m] for m in evaluate.METRICS} for split in rows}
    out[name]["all"] = {m: float(np.mean([r[m] for r in records])) for m in evaluate.METRICS}
    for split in SPLITS:
      out[name][split]["searches"] = float(np.mean([r["searches"] for r in records
                                                    if split in ("all", r["set"])]))
    out[name]["searches_per_question"] = out[name]["all"]["searches"]
    predictions += [dict(r, method=name) for r in records]
    del params
    jax.clear_caches()
  write_jsonl(workdir / "predictions.jsonl", predictions)
  return out


def paired_gains(records: list[dict], base: str = "warm_start") -> dict:
  """Each method's test-EM gain over ``base`` on the same questions:
  ``{method: {"em": mean of per-question differences, "stderr": their sample
  standard deviation (ddof 1) over sqrt(n), "n": questions}}``. ``records``: the evaluation's
  predictions (``method``, ``set``, ``id``, ``em``). Pairing removes the spread
  of question difficulty that two independent standard errors would carry."""
  by_method: dict[str, dict] = {}
  for r in records:
    by_method.setdefault(r["method"], {})[(r["set"], r["id"])] = float(r["em"])
  if base not in by_method:
    return {}
  gains = {}
  for method, scores in by_method.items():
    if method == base:
      continue
    if scores.keys() != by_method[base].keys():
      raise ValueError(f"method {method!r} was evaluated on other questions than {base!r}.")
    diff = np.array([scores[q] - by_method[base][q] for q in sorted(scores)])
    stderr = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    gains[method] = {"em": float(diff.mean()), "stderr": stderr, "n": int(len(diff))}
  return gains


# How results.md says each method is prompted.
PROMPTS = {
    "warm_start": "the search template (``config.instruction``), BM25 as the engine, greedy",
    "direct": "``evaluate.DIRECT_INSTRUCTION`` and the question, no search (a format in the "
              "warm start's demonstrations)",
    "rag": "``evaluate.RAG_INSTRUCTION``, BM25's top-k documents for the question, then the "
           "question; no further search (a format in the warm start's demonstrations)",
    "rl_simulator": "the search template after RL against the simulator; BM25 at test",
    "rl_real_search": "the search template after RL against BM25",
}


def _gain_line(gains: dict, base: str) -> list[str]:
  if not gains:
    return []
  n = next(iter(gains.values()))["n"]
  return ["", f"All-EM gain over {base}, paired over the same {n} test questions "
          "(± one standard error): " + ", ".join(
              f"{m} {100 * g['em']:+.1f} ± {100 * g['stderr']:.1f}"
              for m, g in gains.items()) + "."]


def results_table(results: dict) -> str:
  lines = ["| method | " + " | ".join(f"{s} EM" for s in SPLITS) + " | all substring EM | "
           "all F1 | searches / question (single, two-hop) |",
           "|---|" + "---|" * (len(SPLITS) + 3)]
  for method in (m for m in METHODS if m in results["methods"]):
    r = results["methods"][method]
    cells = [f"{100 * r[s]['em']:.1f}" for s in SPLITS]
    searches = (f" ({r['single_hop']['searches']:.2f}, {r['two_hop']['searches']:.2f})"
                if "searches" in r["single_hop"] else "")
    cells += [f"{100 * r['all']['substring_em']:.1f}", f"{100 * r['all']['f1']:.1f}",
              f"{r['searches_per_question']:.2f}{searches}"]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  lines += _gain_line(results.get("gains_over_warm_start") or {}, "warm_start")
  rag = {m: g for m, g in (results.get("gains_over_rag") or {}).items() if m.startswith("rl_")}
  lines += _gain_line(rag, "rag")
  lines += ["", "Prompts: " + "; ".join(f"{m}: {PROMPTS[m]}" for m in METHODS
                                        if m in results["methods"]) + "."]
  control = results.get("simulator_control")
  if control:
    lines += ["", "Simulator control (test questions' queries as RL writes them; % whose "
              "documents hold the question's gold answer / % with a document that names the "
              "query's subject and the answer):", "", controllability_table(control)]
  seconds = results["stage_seconds"]
  lines += ["", "Stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
            + f"; total {sum(seconds.values()):.0f} s."]
  env = results.get("environment")
  if env:
    lines += ["", f"Machine: {env['cpu']}, {env['cores']} cores; commit {env['commit']}; "
              + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + "."]
  return "\n".join(lines)


# The RL plots: file name, title, and the metrics drawn (one line each per run).
PLOTS = (("reward_f1", "training reward (F1)", ("reward/f1",)),
         ("reward_em", "training EM", ("reward/em",)),
         ("rollout_searches", "searches per trajectory", ("rollout/searches",)),
         ("searches_by_hops", "searches per trajectory (single-hop, two-hop)",
          ("rollout/searches/single_hop", "rollout/searches/two_hop")),
         ("reward_f1_by_hops", "training reward F1 (single-hop, two-hop)",
          ("reward/f1/single_hop", "reward/f1/two_hop")),
         ("curriculum_p_noise", "noise probability", ("curriculum/p_noise",)))


def plot_runs(runs: dict[str, list[dict]], directory: Path, colors: dict | None = None) -> list:
  """One PNG per ``PLOTS`` entry under ``directory``: a line per run (``runs``:
  label -> metrics.jsonl records) and metric, metrics told apart by line style.
  ``colors``: label -> color (runs of one seed share one). Returns the files."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  directory.mkdir(parents=True, exist_ok=True)
  written = []
  for name, title, keys in PLOTS:
    if not any(k in rec for records in runs.values() for rec in records[:1] for k in keys):
      continue
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, records in runs.items():
      for key, style in zip(keys, ("-", "--")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
          suffix = f" {key.rsplit('/', 1)[-1]}" if len(keys) > 1 else ""
          ax.plot(*zip(*points), style, label=label + suffix,
                  color=(colors or {}).get(label))
    ax.set_xlabel("RL step")
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(directory / f"{name}.png", dpi=100)
    plt.close(fig)
    written.append(directory / f"{name}.png")
  return written


def plot_training(workdir: Path) -> None:
  """``plot_runs`` of RL against the simulator and against BM25 into ``WORKDIR/plots``."""
  runs = {name: read_jsonl(workdir / name / "metrics.jsonl")
          for name in ("rl_simulator", "rl_real_search")
          if (workdir / name / "metrics.jsonl").exists()}
  plot_runs(runs, workdir / "plots")


__all__ = ["METHODS", "SPLITS", "COMMON_FIELDS", "DEMO_FORMATS", "CONTROL_GROUPS", "ANSWERABLE",
           "PROMPTS", "PLOTS", "demonstrations", "demonstration_worlds", "warm_start_rows",
           "control_queries", "answers", "controllability", "controllability_table",
           "stages_of", "simulator_dir", "write_results", "evaluate_policies", "paired_gains",
           "results_table", "plot_runs", "plot_training", "run"]
