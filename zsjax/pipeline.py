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
  warm_start   the policy LM trained on *format* demonstrations from other
               worlds: search the question (and a two-hop question's bridge
               entity), read the BM25 documents, answer with a name of the right
               kind drawn from them (right only by chance). The documents carry
               no loss, so it learns the template, not facts and not which name
               answers;
  rl_simulator the warm-start policy trained with RL (REINFORCE by default)
               against the tuned simulator under the noise curriculum;
  rl_real      the same RL against the real BM25 engine (the paper's comparison);
  evaluate     the test split with the real BM25 engine, greedy, for the
               warm-start policy, direct answering, one-shot RAG, and both RL
               policies; strict EM, substring EM and F1 on single-hop, two-hop and
               all questions.

With ``config.stage_cache=DIR`` every stage up to RL lives in ``DIR/<stage>/<key>``
(``StageCache``), the key a digest of exactly the config fields that stage and
its inputs read, and the workdir holds a symlink to it. Points of a sweep that
share a seed and differ only in, say, the RL algorithm then build the world,
pretrain, tune the simulator and warm-start once. ``compare_real_search=False``
leaves out RL against BM25 (an ablation arm needs it once per seed, not per arm).

Outputs: ``results.json`` (``methods.<method>.<split>.<metric>``,
``stage_seconds.<stage>`` -- a reused stage counts the seconds it took when it
was made -- ``reused_stages``, and ``gains_over_warm_start.<method>.{em,stderr,n}``,
each method's test-EM gain paired over the same questions), ``results.md``,
``predictions.jsonl`` (every test answer), ``plots/*.png``, TensorBoard logs and
checkpoints of every training stage, and ``final_policy/`` (HF export of the
policy trained against the simulator).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import ml_collections
import numpy as np

import zsjax
from zsjax import tinyworld
from zsjax.data import write_jsonl
from zsjax.metrics import read_jsonl
from zsjax.template import render_documents, render_observation, render_prompt

METHODS = ("warm_start", "direct", "rag", "rl_simulator", "rl_real_search")
SPLITS = ("single_hop", "two_hop", "all")


def _log(config, message: str) -> None:
  if config.progress:
    print(f"[tiny_world] {message}", flush=True)


def demonstrations(world: dict, engine, instruction: str, seed: int,
                   correct_fraction: float = 0.0) -> list[dict]:
  """Format demonstrations on ``world`` (a world other than the test world):
  ``prompt`` = the policy prompt, ``target`` = a trajectory that searches the
  question (and the bridge entity of a two-hop question), sees the BM25
  documents exactly as the rollout inserts them, and answers with the right
  answer for a ``correct_fraction`` of the questions, otherwise with a name drawn
  from those documents (of the gold answer's kind where there is one: a city for
  a "where" question), right only by chance."""
  from zsjax.search import SearchRequest

  rng = np.random.default_rng(seed)
  # longest first, ties by name: a fixed order (set order varies with PYTHONHASHSEED)
  names = sorted({d["title"] for d in world["corpus"]}, key=lambda n: (-len(n), n))
  kind = {d["title"]: d["kind"] for d in world["corpus"]}
  rows = []
  for q in world["splits"]["train"]:
    queries = [q["question"]] + ([q["bridge"]] if q["bridge"] else [])
    segments, loss, seen_docs = [], [], []
    for query in queries:
      docs = engine.search([SearchRequest(query)]).documents[0]
      seen_docs += docs
      segments += [f"<search> {query} </search>", render_observation(docs)]
      loss += [1, 0]  # the documents are inserted, not written: no loss on them
    text = " ".join(seen_docs)
    mentioned = [n for n in names if n in text and n not in q["question"]] or names[:1]
    # A name of the gold answer's kind (a city for "where", ...) when the documents
    # hold one: the format of a good answer, right only by chance.
    typed = [n for n in mentioned if kind.get(n) == kind.get(q["golden_answers"][0])]
    mentioned = typed or mentioned
    answer = mentioned[rng.integers(len(mentioned))]
    if rng.random() < correct_fraction:
      answer = q["golden_answers"][0]
    segments.append(f"<answer> {answer} </answer>")
    loss.append(1)
    rows.append({"prompt": render_prompt(q["question"], None, instruction, False),
                 "target": "".join(segments), "target_segments": segments,
                 "target_loss": loss})
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


def _sub_config(config, **sections) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict({
      "seed": config.seed, "progress": config.progress, "mesh": config.mesh.to_dict(),
      "sharding": config.sharding, "sharding_rules": config.sharding_rules,
      "distributed": config.distributed.to_dict()})
  for name, value in sections.items():
    out[name] = value.to_dict() if hasattr(value, "to_dict") else value
  return out


def _train_lm(config, directory: Path, tokenizer: str, model, sft, rows) -> None:
  """A random LM of shape ``model`` trained with ``zsjax.train_sft`` on ``rows``
  (written to ``directory/data.jsonl``); outputs land in ``directory``."""
  from zsjax import train_sft

  data = write_jsonl(directory / "data.jsonl", rows)
  sub = _sub_config(config, tokenizer=tokenizer, model=dict(
      checkpoint="", param_dtype="float32", dtype="float32", remat="none",
      model=model.to_dict()), sft=dict(sft.to_dict(), data=str(data)),
      checkpoint=config.checkpoint)
  train_sft.run(sub, str(directory))


class StageCache:
  """Stage outputs shared between workdirs, keyed by the config they depend on.

  ``key(name, inputs)`` digests a stage's inputs (config sections and the keys of
  the stages it reads) with the zsjax version; ``attach`` points
  ``workdir/<name>`` at ``root/<name>/<key>``. An entry is finished when the
  stage's marker exists in it; ``stage.json`` beside the outputs records the
  seconds it took and the inputs it was keyed on. A workdir's own finished stage
  directory (made without the cache) is moved into the cache on first use. The
  key covers configuration, not code: clear the cache after changing code that
  changes a stage's output. Making an entry holds an exclusive lock on
  ``root/<name>/<key>.lock`` (``fcntl.flock``): a run that needs an entry another
  run is making waits for it and then links it, so a sweep's points can be
  launched in parallel (on a shared file system, one whose locks reach every
  machine).
  """

  def __init__(self, root: str | os.PathLike):
    self.root = Path(root).absolute()

  @staticmethod
  def key(name: str, inputs: dict) -> str:
    text = json.dumps({"stage": name, "version": zsjax.__version__, "inputs": inputs},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

  def attach(self, workdir: Path, name: str, key: str, marker: str, seconds: dict) -> Path:
    """Links ``workdir/name`` to its entry (adopting a finished local one)."""
    link, entry = workdir / name, self.root / name / key
    if link.is_symlink():
      if link.resolve() != entry.resolve():
        raise ValueError(
            f"{link} links to {os.readlink(link)}, but this config's {name} stage is "
            f"{entry} (config.stage_cache={str(self.root)!r}); the config changed since this "
            f"workdir was made: use a new --workdir, or remove the link to recompute.")
      return entry
    if link.exists():
      if entry.exists() or not (workdir / marker).exists():
        return link  # the workdir's own (unfinished, or the cache has one): left alone
      entry.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(link), str(entry))
      if name in seconds:
        self.record(entry, workdir, seconds[name], "adopted from the workdir")
    entry.mkdir(parents=True, exist_ok=True)
    link.symlink_to(entry, target_is_directory=True)
    return entry

  @contextlib.contextmanager
  def lock(self, name: str, key: str, log=None):
    """Holds the exclusive lock of entry ``name/key`` (waiting for it if held)."""
    path = self.root / name / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
      try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        if log is not None:
          log(f"{name}: another run is making {path.with_suffix('')}; waiting for it")
        fcntl.flock(handle, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(handle, fcntl.LOCK_UN)

  @staticmethod
  def record(entry: Path, workdir: Path, stage_seconds: float, inputs) -> None:
    (entry / "stage.json").write_text(json.dumps(
        {"seconds": stage_seconds, "made_in": str(workdir.absolute()), "inputs": inputs},
        indent=2, default=str) + "\n")

  @staticmethod
  def made(entry: Path) -> dict | None:
    """``{"seconds", "made_in", "inputs"}`` of a finished entry, else None."""
    path = entry / "stage.json"
    return json.loads(path.read_text()) if path.exists() else None


def _stage(config, workdir: Path, name: str, marker: str, fn, seconds: dict,
           cache: StageCache | None = None, inputs: dict | None = None,
           reused: list | None = None) -> str | None:
  """Runs stage ``name`` unless ``workdir/marker`` exists; returns its cache key
  (None without a cache). A stage another workdir made is added to ``reused``.
  With a cache, the entry's lock is held from the check to the end of making it."""
  if cache is None or inputs is None:
    _run_stage(config, workdir, name, marker, fn, seconds)
    return None
  key = cache.key(name, inputs)
  with cache.lock(name, key, log=lambda message: _log(config, message)):
    entry = cache.attach(workdir, name, key, marker, seconds)
    _run_stage(config, workdir, name, marker, fn, seconds, entry, inputs, reused)
  return key


def _run_stage(config, workdir: Path, name: str, marker: str, fn, seconds: dict,
               entry: Path | None = None, inputs=None, reused: list | None = None) -> None:
  """``_stage`` without the cache's key and lock; ``entry``: the stage's cache entry."""
  if (workdir / marker).exists():
    made = StageCache.made(entry) if entry is not None else None
    if made is not None:
      seconds[name] = made["seconds"]
      if made["made_in"] != str(workdir.absolute()) and reused is not None:
        reused.append(name)
    _log(config, f"{name}: done before, skipped")
    return
  _log(config, f"{name} ...")
  start = time.perf_counter()
  fn()
  seconds[name] = time.perf_counter() - start
  if entry is not None:
    StageCache.record(entry, workdir, seconds[name], inputs)
  (workdir / "stage_seconds.json").write_text(json.dumps(seconds, indent=2) + "\n")
  _log(config, f"{name}: {seconds[name]:.1f} s")


def _section(config, *names) -> dict:
  """The named config fields as plain values (a stage's cache-key inputs)."""
  out = {}
  for name in names:
    value = config.get(name)
    out[name] = value.to_dict() if hasattr(value, "to_dict") else value
  return out


def run(config, workdir: str) -> dict:
  from zsjax import search, sim_tuning, train_rl

  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  seconds_file = workdir / "stage_seconds.json"
  seconds = json.loads(seconds_file.read_text()) if seconds_file.exists() else {}
  size = tinyworld.WorldSize(**config.world.to_dict())
  world_dir = workdir / "world"
  paths = {}
  cache = StageCache(config.stage_cache) if config.stage_cache else None
  reused: list[str] = []
  common = _section(config, "seed", "mesh", "sharding", "sharding_rules", "checkpoint")

  def build_world():
    paths.update(tinyworld.ensure(world_dir, config.seed, size))

  world_key = _stage(config, workdir, "world", "world/world.json", build_world, seconds, cache,
                     dict(common, **_section(config, "world")), reused)
  paths = tinyworld.paths(world_dir)
  tokenizer = paths["tokenizer"]
  instruction = config.instruction
  sim_template = config.simulator_template

  # -- simulator: pretrain on documents, then tune on labelled BM25 results
  def pretrain():
    # The world's documents as search results: each entity's name as the query,
    # its BM25 top-k rendered the way the simulator will have to write them.
    engine = search.BM25Engine.from_jsonl(paths["corpus"], top_k=config.top_k)
    titles = [d["title"] for d in read_jsonl(paths["corpus"])]
    results = engine.search([search.SearchRequest(t) for t in titles]).documents
    rows = [{"prompt": f"Query: {t}\nDocuments:\n", "target": render_documents(docs)}
            for t, docs in zip(titles, results)]
    _train_lm(config, workdir / "pretrain", tokenizer, config.simulator_model, config.pretrain,
              rows)

  pretrain_key = _stage(config, workdir, "pretrain", "pretrain/sft_summary.json", pretrain,
                        seconds, cache, dict(common, world=world_key, **_section(
                            config, "top_k", "simulator_model", "pretrain")), reused)

  def tune_simulator():
    # An oracle searcher (the question, a two-hop question's bridge entity, and a
    # question about another entity) against BM25, on this world's training
    # questions and on `sim_worlds` other worlds (many distinct answers: the
    # simulator must learn to copy what its prompt holds, not memorise documents).
    # The oracle's searches are labelled by what they answer (QueryJudge) and
    # written as sim_tuning's labelled pairs, so its own rule-based labelling of
    # the question's answer is skipped.
    wide = config.top_k * 4
    corpus = read_jsonl(paths["corpus"])
    sources = [("", _parquet_rows(paths["train"]), corpus,
                search.BM25Engine([d["contents"] for d in corpus], top_k=wide))]
    for k in range(config.sim_worlds):
      other = tinyworld.generate(config.seed + 104729 * (k + 1), size)
      sources.append((f"w{k}-", other["splits"]["train"], other["corpus"], search.BM25Engine(
          [d["contents"] for d in other["corpus"]], top_k=wide)))
    trajectories, pairs = oracle_searches(sources, config.top_k, config.seed)
    out = workdir / "sim_tuning"
    write_jsonl(out / "trajectories.jsonl", trajectories)
    kept = sim_tuning.balance(pairs, config.seed)
    write_jsonl(out / "pairs.jsonl", kept)
    (out / "labels.json").write_text(json.dumps(
        {"judge": "pipeline.QueryJudge", "before_balance": sim_tuning.label_counts(pairs),
         "after_balance": sim_tuning.label_counts(kept)}, indent=2) + "\n")
    sub = _sub_config(
        config, tokenizer=tokenizer, synthetic_data=False, simulator_template=sim_template,
        model=dict(checkpoint=str(workdir / "pretrain" / "hf_export"), param_dtype="float32",
                   dtype="float32", remat="none", model={}),
        data=dict(train_files=paths["train"], on_error="skip"),
        engine=dict(kind="bm25", corpus=paths["corpus"], text_field="contents",
                    top_k=config.top_k, url="", model="", timeout_s=30.0, max_retries=2),
        sim_tuning=dict(config.sim_tuning.to_dict(), queries="question", batch_size=16,
                        judge="rule", judge_checkpoint="", judge_prompt="", balance=True),
        sft=config.sim_sft, checkpoint=config.checkpoint)
    sim_tuning.run(sub, str(out))

  # the simulator RL trains against: tuned, or prompt-only (the pretrained LM)
  simulator_key, simulator_dir = pretrain_key, workdir / "pretrain" / "hf_export"
  if config.tune_simulator:
    simulator_dir = workdir / "sim_tuning" / "sft" / "hf_export"
    simulator_key = _stage(
        config, workdir, "sim_tuning", "sim_tuning/sim_tuning.json", tune_simulator, seconds,
        cache, dict(common, pretrain=pretrain_key, **_section(
            config, "top_k", "simulator_template", "sim_worlds", "sim_tuning", "sim_sft")),
        reused)

  # -- policy: format warm start on another world, then RL
  def warm_start():
    # Demonstrations come from `demo_worlds` other worlds (other seeds: many distinct
    # names, so copying pays and memorising does not) and, with demo_world="train",
    # from this world's training questions too: their documents carry no loss and
    # their answers are a name drawn from the documents (right only by chance).
    worlds = [(tinyworld.generate(config.seed + 7919 * (k + 1), size),
               config.demo_correct_fraction)
              for k in range(max(config.demo_worlds,
                                 int(config.demo_world == "other")))]
    if config.demo_world == "train":
      worlds.append((tinyworld.generate(config.seed, size), 0.0))
    rows = []
    for k, (demo_world, correct) in enumerate(worlds):
      engine = search.BM25Engine([d["contents"] for d in demo_world["corpus"]],
                                 top_k=config.top_k)
      rows += demonstrations(demo_world, engine, instruction, config.seed + k, correct)
    _train_lm(config, workdir / "warm_start", tokenizer, config.policy_model, config.warm_start,
              rows)

  warm_key = _stage(config, workdir, "warm_start", "warm_start/sft_summary.json", warm_start,
                    seconds, cache, dict(common, world=world_key, **_section(
                        config, "top_k", "instruction", "demo_correct_fraction", "demo_world",
                        "demo_worlds", "policy_model", "warm_start")), reused)

  def rl(engine_kind: str, name: str):
    def go():
      base = ml_collections.ConfigDict(config.rl.to_dict())
      sub = _sub_config(
          config, tokenizer=tokenizer, synthetic_data=False,
          policy=dict(checkpoint=str(workdir / "warm_start" / "hf_export"), param_dtype="float32",
                      dtype="float32", remat="none", model={}),
          simulator=dict(checkpoint=str(simulator_dir),
                         param_dtype="float32", dtype="float32", remat="none", model={},
                         template=sim_template, **base.simulator.to_dict()),
          engine=dict(kind=engine_kind, top_k=config.top_k, corpus=paths["corpus"],
                      text_field="contents", url="", model="", timeout_s=30.0, max_retries=2),
          data=dict(train_files=paths["train"], on_error="skip",
                    limit=config.rl.questions, chat_template=False,
                    instruction=instruction),
          rollout=base.rollout, sampling=base.sampling, curriculum=base.curriculum,
          rl=base.rl, checkpoint=dict(config.checkpoint.to_dict(), every=base.rl.total_steps))
      train_rl.run(sub, str(workdir / name))
    return go

  rl_inputs = dict(common, warm_start=warm_key, **_section(config, "top_k", "instruction", "rl"))
  _stage(config, workdir, "rl_simulator", "rl_simulator/rl_summary.json",
         rl("simulator", "rl_simulator"), seconds, cache,
         dict(rl_inputs, simulator=simulator_key, template=sim_template), reused)
  compared = [m for m in METHODS
              if m != "rl_real_search" or config.compare_real_search]
  if "rl_real_search" in compared:
    _stage(config, workdir, "rl_real_search", "rl_real_search/rl_summary.json",
           rl("bm25", "rl_real_search"), seconds, cache, rl_inputs, reused)

  # -- evaluation with the real engine
  def evaluate_all():
    results = evaluate_policies(config, workdir, paths, tokenizer, instruction, compared)
    (workdir / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")

  _stage(config, workdir, "evaluate", "evaluation.json", evaluate_all, seconds)

  methods = json.loads((workdir / "evaluation.json").read_text())
  results = {"methods": methods, "stage_seconds": seconds,
             "total_seconds": float(sum(seconds.values())), "seed": config.seed,
             "reused_stages": reused,
             "gains_over_warm_start": paired_gains(read_jsonl(workdir / "predictions.jsonl"))}
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
    out[name]["searches_per_question"] = float(np.mean([r["searches"] for r in records]))
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


def results_table(results: dict) -> str:
  lines = ["| method | " + " | ".join(f"{s} EM" for s in SPLITS) + " | all substring EM | "
           "all F1 | searches / question |", "|---|" + "---|" * (len(SPLITS) + 3)]
  for method in (m for m in METHODS if m in results["methods"]):
    r = results["methods"][method]
    cells = [f"{100 * r[s]['em']:.1f}" for s in SPLITS]
    cells += [f"{100 * r['all']['substring_em']:.1f}", f"{100 * r['all']['f1']:.1f}",
              f"{r['searches_per_question']:.2f}"]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  gains = results.get("gains_over_warm_start") or {}
  if gains:
    n = next(iter(gains.values()))["n"]
    lines += ["", f"All-EM gain over warm_start, paired over the same {n} test questions "
              "(± one standard error): " + ", ".join(
                  f"{m} {100 * g['em']:+.1f} ± {100 * g['stderr']:.1f}"
                  for m, g in gains.items()) + "."]
  seconds = results["stage_seconds"]
  lines += ["", "Stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
            + f"; total {sum(seconds.values()):.0f} s."]
  return "\n".join(lines)


def plot_training(workdir: Path) -> None:
  """PNG plots of RL against the simulator and against BM25: training reward,
  EM, searches per question and p_noise over steps."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  (workdir / "plots").mkdir(exist_ok=True)
  runs = {name: read_jsonl(workdir / name / "metrics.jsonl")
          for name in ("rl_simulator", "rl_real_search")
          if (workdir / name / "metrics.jsonl").exists()}
  for key, title in (("reward/f1", "training reward (F1)"), ("reward/em", "training EM"),
                     ("rollout/searches", "searches per trajectory"),
                     ("curriculum/p_noise", "noise probability")):
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, records in runs.items():
      ax.plot([r["step"] for r in records], [r[key] for r in records], label=name)
    ax.set_xlabel("RL step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "plots" / f"{key.replace('/', '_')}.png", dpi=100)
    plt.close(fig)


__all__ = ["METHODS", "SPLITS", "StageCache", "demonstrations", "evaluate_policies",
           "paired_gains", "results_table", "plot_training", "run"]
