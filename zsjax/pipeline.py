"""The tiny world end to end (``job="tiny_world"``): the paper's pipeline at small
scale, offline, from nothing.

This file is the stage table and the jobs each stage runs; the data the stages
learn from is ``zsjax.demonstrations``, the report they end in ``zsjax.report``.

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
               whether they answer the *query* (``demonstrations.QueryJudge``) -> balanced SFT
               set -> the pretrained LM tuned into the search simulator
               (``sim_tuning``);
  reading      (when ``config.reading_drills`` > 0; off by default while it is
               measured) the policy LM's first lessons: short reading drills on
               64 *other* worlds (the question, its search, one document holding
               the answer, the answer; ``demonstrations.reading_drills``), checked
               on a further world's drills: the stage fails when reading did not form;
  warm_start   from there (or from random weights), trained on correct
               demonstrations from 64 *other* worlds
               (``demonstrations.demonstrations``): the search template (search the question, and for a share of two-hop questions the bridge entity,
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
               (``report.controllability``).

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
``simulator_control`` (``controllability``), ``warm_start`` (its steps and held-out
reading check, ``warm_start_summary``) and ``environment`` (CPU, cores,
package versions, commit: ``zsjax.environment``)), ``results.md``,
``predictions.jsonl`` (every test answer), ``simulator_samples.jsonl``,
``plots/*.png``, TensorBoard logs and checkpoints of every training stage, and
``final_policy/`` (HF export of the policy trained against the simulator).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from zsjax import demonstrations, environment, evaluate, hf, report, search, sim_tuning
from zsjax import rollout as rollout_lib
from zsjax import tinyworld, train_rl, train_sft
from zsjax.data import write_jsonl
from zsjax.metrics import read_jsonl
from zsjax.stages import Stage, StageCache, StageRun, run_stage
from zsjax.template import render_documents

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


def _train_lm(config, section: str, directory: Path, tokenizer: str, rows,
              values: dict | None = None) -> None:
  """The sft job of ``config[section]`` (with ``values``) trained on ``rows``
  (written to ``directory/data.jsonl``); outputs land in ``directory``."""
  data = write_jsonl(directory / "data.jsonl", rows)
  train_sft.run(job_config(config, section, {"tokenizer": tokenizer, "sft.data": str(data),
                                             **(values or {})}), str(directory))


# ------------------------------------------------------------------ the stages


def _world_paths(run: StageRun) -> dict:
  return tinyworld.paths(run.workdir / "world")


def make_world(run: StageRun) -> None:
  tinyworld.ensure(run.workdir / "world", run.config.seed, tinyworld.WorldSize.from_config(run.config.world))


def make_pretrain(run: StageRun) -> None:
  """The world's documents as search results: each entity's name as the query,
  its BM25 top-k rendered the way the simulator will have to write them."""
  config, paths = run.config, _world_paths(run)
  engine = search.BM25Engine.from_jsonl(paths["corpus"], top_k=config.top_k)
  # each entity once (a version 4 world gives a person two documents of one title)
  titles = list(dict.fromkeys(d["title"] for d in read_jsonl(paths["corpus"])))
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
  config, paths, out = run.config, _world_paths(run), run.workdir / "sim_tuning"
  wide = config.top_k * 4
  corpus = read_jsonl(paths["corpus"])
  sources = [("", _parquet_rows(paths["train"]), corpus,
              search.BM25Engine([d["contents"] for d in corpus], top_k=wide))]
  for k in range(config.sim_worlds):
    other = tinyworld.generate(config.seed + 104729 * (k + 1), tinyworld.WorldSize.from_config(config.world))
    sources.append((f"w{k}-", other["splits"]["train"], other["corpus"], search.BM25Engine(
        [d["contents"] for d in other["corpus"]], top_k=wide)))
  trajectories, pairs = demonstrations.oracle_searches(sources, config.top_k, config.seed)
  write_jsonl(out / "trajectories.jsonl", trajectories)
  kept = sim_tuning.balance(pairs, config.seed)
  write_jsonl(out / "pairs.jsonl", kept)
  (out / "labels.json").write_text(json.dumps(
      {"judge": "demonstrations.QueryJudge", "before_balance": sim_tuning.label_counts(pairs),
       "after_balance": sim_tuning.label_counts(kept)}, indent=2) + "\n")
  sub = job_config(config, "sim_tuning", {
      "tokenizer": paths["tokenizer"], "simulator_template": config.simulator_template,
      "model.checkpoint": str(run.workdir / "pretrain" / "hf_export"),
      "data.train_files": paths["train"], "engine.corpus": paths["corpus"],
      "engine.top_k": config.top_k})
  sim_tuning.run(sub, str(out))


def make_reading(run: StageRun) -> None:
  """The policy LM's first stage: short reading drills on other worlds
  (``demonstrations.reading_rows``). It fails, naming what to change, when the
  held-out drills' answer NLL is still above ``config.reading_nll_max`` at its end:
  a warm start that cannot read would make the RL comparison one of luck."""
  config, out = run.config, run.workdir / "reading"
  _train_lm(config, "warm_start", out, _world_paths(run)["tokenizer"],
            demonstrations.reading_rows(config), {
                "sft.total_steps": config.reading_steps, "sft.eval_every": config.reading_steps,
                "sft.batch_size": config.reading_batch_size,
                "sft.max_length": config.reading_max_length,
                "sft.learning_rate": config.reading_learning_rate, "sft.decay": "constant"})
  _refuse_unread(out, config.reading_nll_max, "config.reading_nll_max",
                 "Raise config.reading_steps or config.reading_drills")


def _refuse_unread(out: Path, nll_max: float, field: str, fix: str) -> None:
  """Fails when a policy stage's held-out reading check (``eval/nll`` of its
  summary) ended above ``nll_max``, keeping the stage as ``<stage>.failed``: a
  policy that cannot read would make the RL comparison one of luck."""
  summary = json.loads((out / "sft_summary.json").read_text())
  # absent when a resumed job had nothing left to train: unchecked counts as failed;
  # a check by group (sft.stop_group) is judged on its worst group
  worst = "eval/nll_worst" in summary
  nll = summary.get("eval/nll_worst" if worst else "eval/nll", float("inf"))
  if nll <= nll_max:
    return
  failed = out.with_name(f"{out.name}.failed")
  shutil.rmtree(failed, ignore_errors=True)
  out.rename(failed)
  raise RuntimeError(
      f"the {out.name} stage did not learn to read: after {summary.get('sft/steps', '?')} steps the "
      f"held-out answer NLL{' of its worst group' if worst else ''} is {nll:.3f} > "
      f"{field}={nll_max} (the curve: "
      f"{failed / 'metrics.jsonl'}). {fix}; the failed stage is kept in {failed}, and a rerun "
      "makes it again from nothing.")


def make_warm_start(run: StageRun) -> None:
  """The policy LM trained on ``warm_start_rows``: other worlds (many distinct
  facts over the same name pools, so reading pays and memorising does not),
  from the reading stage's model when there is one. With
  ``warm_start.sft.stop_nll`` it ends once the held-out reading check passes, and
  fails when the cap is reached without it."""
  config, out = run.config, run.workdir / "warm_start"
  start = {"model.checkpoint": str(run.workdir / "reading" / "hf_export")} \
      if config.reading_drills else {}
  _train_lm(config, "warm_start", out, _world_paths(run)["tokenizer"],
            demonstrations.warm_start_rows(config), start)
  s = config.warm_start.sft
  if s.stop_nll:
    _refuse_unread(out, s.stop_nll, "config.warm_start.sft.stop_nll",
                   f"Raise the cap, config.warm_start.sft.total_steps={s.total_steps}")


def simulator_dir(run: StageRun) -> Path:
  """The simulator RL trains against: tuned, or prompt-only (the pretrained LM)."""
  if run.config.tune_simulator:
    return run.workdir / "sim_tuning" / "sft" / "hf_export"
  return run.workdir / "pretrain" / "hf_export"


def _make_rl(run: StageRun, engine_kind: str, name: str) -> None:
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
  return [m for m in report.METHODS if m != "rl_real_search" or config.compare_real_search]


def make_evaluation(run: StageRun) -> None:
  """The policies on the test split (``evaluate_policies``) and the simulator's
  controllability on the test questions' queries (``controllability``)."""
  paths = _world_paths(run)
  control = report.controllability(run.config, run.workdir, simulator_dir(run))
  (run.workdir / "controllability.json").write_text(json.dumps(control, indent=2) + "\n")
  results = evaluate_policies(run.config, run.workdir, paths, paths["tokenizer"],
                              run.config.instruction, compared_methods(run.config))
  (run.workdir / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")


# Every stage's cache key covers these fields and the ones it declares.
COMMON_FIELDS = ("seed", "mesh", "sharding", "sharding_rules", "checkpoint")
WORLD = Stage("world", "world/world.json", make_world, reads=("world",))
PRETRAIN = Stage("pretrain", "pretrain/sft_summary.json", make_pretrain,
                 reads=("top_k", "pretrain"), after=("world",))
SIM_TUNING = Stage("sim_tuning", "sim_tuning/sim_tuning.json", make_sim_tuning,
                   reads=("top_k", "simulator_template", "sim_worlds", "sim_tuning"),
                   after=("pretrain",))
READING = Stage("reading", "reading/sft_summary.json", make_reading,
                reads=("top_k", "world", "demo_worlds", "reading_drills", "reading_documents",
                       "reading_nll_max", "reading_steps", "reading_batch_size",
                       "reading_max_length", "reading_learning_rate", "warm_start"),
                after=("world",))
WARM_START = Stage("warm_start", "warm_start/sft_summary.json", make_warm_start,
                   reads=("top_k", "instruction", "demo_worlds", "demo_this_world",
                          "demo_bridge_fraction", "demo_baseline_fraction",
                          "demo_balance_relations", "demo_shuffle_documents", "demo_think",
                          "reading_drills", "warm_start"),
                   after=("world", "reading"))
RL_SIMULATOR = Stage("rl_simulator", "rl_simulator/rl_summary.json", make_rl_simulator,
                     reads=("top_k", "instruction", "rl", "simulator_template"),
                     after=("warm_start", "simulator"))
RL_REAL_SEARCH = Stage("rl_real_search", "rl_real_search/rl_summary.json", make_rl_real_search,
                       reads=("top_k", "instruction", "rl"), after=("warm_start",))
EVALUATE = Stage("evaluate", "evaluation.json", make_evaluation, cached=False)


def stages_of(config) -> list[Stage]:
  """The table this config runs, in order."""
  table = [WORLD, PRETRAIN] + ([SIM_TUNING] if config.tune_simulator else [])
  table += ([READING] if config.reading_drills else []) + [WARM_START, RL_SIMULATOR]
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


def warm_start_summary(workdir: Path) -> dict:
  """The warm start's steps and its held-out reading check (answer NLL on a world
  never demonstrated, before and after; ``sft/formed_step``: where the early stop's
  check passed, -1 never; absent when the stage predates them)."""
  summary = json.loads((workdir / "warm_start" / "sft_summary.json").read_text())
  names = {"sft/steps": "steps", "sft/formed_step": "formed_step",
           "eval/nll_before": "reading_nll_before", "eval/nll": "reading_nll",
           "eval/nll_worst": "reading_nll_worst"}
  return {short: summary[name] for name, short in names.items() if name in summary}


def write_results(config, workdir: Path, state: StageRun) -> dict:
  """``results.json`` / ``results.md``, plots and ``final_policy/``."""
  predictions = read_jsonl(workdir / "predictions.jsonl")
  results = {"methods": json.loads((workdir / "evaluation.json").read_text()),
             "stage_seconds": state.seconds, "total_seconds": float(sum(state.seconds.values())),
             "seed": config.seed, "reused_stages": state.reused,
             "gains_over_warm_start": report.paired_gains(predictions),
             "gains_over_rag": report.paired_gains(predictions, base="rag"),
             "simulator_control": json.loads((workdir / "controllability.json").read_text()),
             "warm_start": warm_start_summary(workdir),
             "environment": environment.describe()}
  (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  table = report.results_table(results)
  (workdir / "results.md").write_text(table + "\n")
  report.plot_training(workdir)
  final = workdir / "final_policy"
  if not final.exists():
    shutil.copytree(workdir / "rl_simulator" / "hf_export", final)
  if config.progress:
    print(table)
  return results


def _parquet_rows(path) -> list[dict]:
  return datasets.Dataset.from_parquet(str(path)).to_list()


def evaluate_policies(config, workdir: Path, paths: dict, tokenizer_dir: str,
                      instruction: str, methods=report.METHODS) -> dict:
  """``{method: {split: {metric: value}}}`` on the test split with BM25, greedy,
  for each of ``methods``."""
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
    for split in report.SPLITS:
      out[name][split]["searches"] = float(np.mean([r["searches"] for r in records
                                                    if split in ("all", r["set"])]))
    out[name]["searches_per_question"] = out[name]["all"]["searches"]
    predictions += [dict(r, method=name) for r in records]
    del params
    jax.clear_caches()
  write_jsonl(workdir / "predictions.jsonl", predictions)
  return out


__all__ = ["RUN_FIELDS", "COMMON_FIELDS", "WORLD", "PRETRAIN", "SIM_TUNING", "READING", "WARM_START",
           "RL_SIMULATOR", "RL_REAL_SEARCH", "EVALUATE", "job_config", "stages_of",
           "simulator_dir", "compared_methods", "write_results", "evaluate_policies", "run"]
