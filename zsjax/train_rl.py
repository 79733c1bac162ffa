"""The RL loop (``job="rl"``): REINFORCE, GRPO or PPO against a search engine.

Set-up (``setup``) builds the tokenizer, the policy, its frozen reference, the
engine (the on-device simulator of ``zsjax.simulator``, or a host engine of
``zsjax.search``), the jitted rollout and the RL programs (``zsjax.rl_step``).
Then each step (``train_step``, METHOD.md §4-§7):

  1. rollout: P prompts x n samples through ``zsjax.rollout`` (one XLA program),
     the engine's noise drawn on device with ``p = curriculum(step)``;
  2. score: the last ``<answer>`` of each row's *own* text against its gold
     answers (``zsjax.rewards.score_answers``; F1 by default);
  3. RL batch: reference and old log-probs, PPO's values, advantages
     (``rl_step.make_rl_batch``);
  4. update: ``epochs x minibatches`` of the donated, accumulating update
     (``rl_step.update_epochs``);
  5. metrics (``rl_step.step_metrics``) and, every ``checkpoint.every`` steps, a
     checkpoint.

A non-finite update is not applied and stops the run, naming the step and the
metric, before that step's checkpoint. Data and random draws are functions of
the step, so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from zsjax import data as data_lib
from zsjax import hf, rl_settings, rl_step, sampling, search, template, tinyworld
from zsjax import rollout as rollout_lib
from zsjax import workdir as workdir_lib
from zsjax.checkpoint import Checkpointer, export_hf
from zsjax.metrics import MetricWriter, compile_seconds, console, drop_steps_after, metrics_at
from zsjax.model import with_compute_dtype
from zsjax.rewards import AnswerScores, score_answers
from zsjax.rl_settings import RLSettings, check_config
from zsjax.sharding import ShardingPlan, is_main_process, to_host


@dataclasses.dataclass
class RLJob:
  """What ``setup`` builds; the loop reads it and changes nothing but dropping
  ``initial_params`` once the first state holds its own copy."""

  config: ml_collections.ConfigDict
  settings: RLSettings  # config.rl, checked
  workdir: Path
  key: jax.Array  # key(seed); step s draws from fold_in(key, s)
  tokenizer: Any
  render: Any  # question -> the policy's prompt (config.data.instruction, chat_template)
  data: Any  # datasets.Dataset of QA rows
  sources: tuple[str, ...]  # the data's data_source values, sorted
  plan: ShardingPlan
  policy_cfg: Any
  initial_params: Any
  ref_params: Any  # frozen, never donated, never in an optimizer (rl.reference_dtype,
  # in host memory with rl.offload_reference)
  engine: Any
  engine_state: Any  # the simulator's params, or a placeholder for host engines
  rollout: Any  # jitted (policy_params, engine_state, RolloutBatch, rng, step) -> Trajectories
  rollout_config: rollout_lib.RolloutConfig
  pad_id: int
  programs: rl_step.RLPrograms


def setup(config: ml_collections.ConfigDict, workdir: str | Path, *,
          draws: tuple[Any, Any] | None = None) -> RLJob:
  """``draws``: ``(policy, simulator)`` sampling strategies in place of
  ``config.sampling`` and the simulator's (``zsjax.sampling.sample`` takes any
  object with a ``sample(logits, rng, position)`` method): a benchmark of random
  models scripts their actions with it (experiments/accelerator_check.py)."""
  r, plan = check_config(config), ShardingPlan.from_config(config)
  r.check_mesh(plan)
  r.check_memory(plan.mesh.devices.flat)
  rl_settings.check_waves(config.rollout.waves, r, plan)
  key = jax.random.key(config.seed)
  tokenizer = hf.config_tokenizer(config, "policy")
  eos_ids = tuple(i for i in (tokenizer.eos_token_id,) if i is not None)
  policy_cfg, params = hf.load_model(config.policy, plan, jax.random.fold_in(key, 1),
                                     len(tokenizer), eos_ids, what="policy")
  style = template.prompt_style(config.data.prompt_style)
  static = rollout_lib.prepare_static_tokens(tokenizer, vocab_size=policy_cfg.vocab_size,
                                             eos_ids=hf.end_tokens(policy_cfg, tokenizer),
                                             feedback=style.feedback)
  policy_sampling = draws[0] if draws else sampling.from_config(config.sampling)
  rollout_config = rollout_lib.RolloutConfig.from_config(config.rollout, config.curriculum,
                                                         r.horizon)
  waves = config.rollout.waves
  if config.rollout.share_prompt and r.samples_per_prompt > 1:
    if (r.prompts_per_step // waves) % plan.batch_divisor == 0:
      rollout_config = dataclasses.replace(rollout_config, prompt_group=r.samples_per_prompt)
    else:
      console(f"config.rollout.share_prompt: a wave's {r.prompts_per_step // waves} prompts do "
              f"not split over data x fsdp = {plan.batch_divisor}; every row prefills its own")
  engine, engine_state, engine_shardings = search.build_engine(
      config, tokenizer, static, rollout_config, plan, jax.random.fold_in(key, 2))
  if draws and config.engine.kind == "simulator":
    engine = dataclasses.replace(engine, sampling=draws[1])
  # the rollout may compute in another precision than training (its params are the same)
  rollout_cfg = with_compute_dtype(policy_cfg, config.rollout.dtype,
                                   "config.rollout.dtype")
  rollout = rollout_lib.shard_rollout(
      rollout_lib.make_rollout(rollout_cfg, template.build_tag_matcher(
          tokenizer, vocab_size=policy_cfg.vocab_size), static, engine, rollout_config,
          policy_sampling),
      plan, rollout_cfg, engine=engine, engine_state_shardings=engine_shardings)
  programs = rl_step.build_programs(r, policy_cfg, plan, policy_sampling.temperature)
  # Rows that cannot make a batch (a prompt wider than the fixed width, text too long
  # for the engine) are found now, with file, row and field, not at the step drawing them.
  render = functools.partial(template.render_prompt, tokenizer=tokenizer,
                             instruction=template.instruction_of(config.data.prompt_style,
                                                                 config.data.instruction),
                             use_chat_template=config.data.chat_template,
                             style=config.data.prompt_style)
  check = rollout_lib.row_check(tokenizer, engine, render, config.rollout.max_prompt_tokens,
                                "config.rollout.max_prompt_tokens")
  data = data_lib.load_qa(config.data.train_files, on_error=config.data.on_error,
                          limit=config.data.limit or None, check=check)
  return RLJob(
      config=config, settings=r, workdir=Path(workdir), key=key, tokenizer=tokenizer,
      render=render,
      data=data, sources=tuple(sorted(set(data["data_source"]))),
      plan=plan, policy_cfg=policy_cfg, initial_params=params,
      ref_params=programs.reference_params(params), engine=engine, engine_state=engine_state,
      rollout=rollout, rollout_config=rollout_config, pad_id=static.pad_id, programs=programs)


def rollout_batch(job: RLJob, step: int, wave: int = 0, waves: int = 1):
  """The step's prompts (a function of the step) as a ``RolloutBatch``, each
  row's gold answers and each row's data source; with ``waves`` > 1, wave
  ``wave``'s share of them (consecutive prompts, whole GRPO groups)."""
  config, r = job.config, job.settings
  rows = data_lib.batch_rows(len(job.data), r.prompts_per_step, config.seed, step - 1)
  share = len(rows) // waves
  rows = rows[wave * share:(wave + 1) * share]
  return rollout_lib.prepare_qa_batch(
      job.tokenizer, [job.data[int(i)] for i in rows], job.render,
      job.engine, samples_per_prompt=r.samples_per_prompt, pad_id=job.pad_id,
      prompt_width=config.rollout.max_prompt_tokens,
      widths=f"config.rollout.max_prompt_tokens={config.rollout.max_prompt_tokens} and "
             f"config.simulator.max_prefix_tokens={config.simulator.max_prefix_tokens}")


def roll_out(job: RLJob, params, step: int, rng):
  """The step's trajectories (on the host), gold answers and data sources, rolled
  out in ``config.rollout.waves`` waves: each wave a jitted rollout of its share of
  the prompts (keyed ``fold_in(rng, wave)``; one wave: ``rng`` itself, the rollout
  of every row at once), so only a wave's KV caches are live at a time."""
  waves = job.config.rollout.waves
  parts, golds, sources = [], [], []
  for wave in range(waves):
    batch, wave_golds, wave_sources = rollout_batch(job, step, wave, waves)
    key = rng if waves == 1 else jax.random.fold_in(rng, wave)
    parts.append(to_host(job.rollout(params, job.engine_state, batch, key, jnp.int32(step))))
    golds += wave_golds
    sources += wave_sources
  traj = parts[0] if waves == 1 else jax.tree_util.tree_map(
      lambda *xs: np.concatenate(xs, axis=0), *parts)
  return traj, golds, sources


def train_step(job: RLJob, state: rl_step.RLState, step: int):
  """One RL step: ``(new state, metrics (host floats), (traj, golds, scores))``.
  Its wall times are ``time/{rollout,score,update}_s``; ``time/*_compile_s`` is the
  compile time inside each (nonzero where a program is first called)."""
  r, programs = job.settings, job.programs
  timings, compiled = {}, compile_seconds()
  start = time.perf_counter()

  def phase_compile(name):  # the compile time inside the phase just timed (first calls)
    nonlocal compiled
    now = compile_seconds()
    timings[f"{name}_compile_s"], compiled = now - compiled, now

  rng = jax.random.fold_in(job.key, step)
  traj, golds, sources = roll_out(job, state.policy.params, step, jax.random.fold_in(rng, 0))
  timings["rollout_s"] = time.perf_counter() - start
  phase_compile("rollout")

  t = time.perf_counter()
  scores = score_answers(job.tokenizer, traj, golds, r.reward)
  reward = scores.train
  timings["reward_s"] = time.perf_counter() - t

  t = time.perf_counter()
  rl_batch = rl_step.make_rl_batch(programs, state, job.ref_params, traj, reward)
  jax.block_until_ready(rl_batch.advantages)
  timings["score_s"] = time.perf_counter() - t
  phase_compile("score")

  t = time.perf_counter()
  state, update_metrics = rl_step.update_epochs(
      programs, state, rl_batch, np.random.default_rng([job.config.seed, step]), rng)
  update_metrics = to_host(update_metrics)
  timings["update_s"] = time.perf_counter() - t
  phase_compile("update")
  timings["step_s"] = time.perf_counter() - start
  metrics = rl_step.step_metrics(update_metrics, traj, scores, reward,
                                 job.rollout_config.noise_probability(step), timings)
  if len(job.sources) > 1:  # per-source reward and searches (e.g. single- vs two-hop)
    metrics.update(rl_step.source_metrics(traj, scores, sources))
  return state, metrics, (traj, golds, scores)


def write_samples(job: RLJob, step: int, traj, golds, scores: AnswerScores) -> None:
  """Appends the step's first ``rl.sample_rows`` trajectories, decoded
  (``rl_step.sample_records``), to ``WORKDIR/samples.jsonl``."""
  with open(job.workdir / "samples.jsonl", "a") as f:
    for record in rl_step.sample_records(job.tokenizer, step, traj, golds, scores,
                                         job.settings.sample_rows):
      f.write(json.dumps(record) + "\n")


def train(job: RLJob) -> dict:
  """The loop: restore or start, then step, write, checkpoint; export at the end.
  A failing engine stops it before the failing step's checkpoint; Ctrl-C or SIGTERM
  lets the step under way finish, saves it (one process) and names the last complete
  checkpoint."""
  config, r, workdir = job.config, job.settings, job.workdir
  workdir.mkdir(parents=True, exist_ok=True)
  ck = config.checkpoint
  checkpointer = Checkpointer.from_config(workdir / "checkpoints", ck)
  checkpointer.refuse_other_run(workdir, "algorithm", r.algorithm, "config.rl.algorithm")
  checkpointer.refuse_other_run(workdir, "seed", config.seed, "config.seed")
  checkpointer.refuse_other_horizon(workdir, r.horizon, r.total_steps, "config.rl")
  inputs = workdir_lib.input_fingerprints(config)  # data, tokenizer, checkpoints, corpus
  checkpointer.refuse_changed_inputs(workdir, inputs)
  record = workdir_lib.identity_record(workdir)  # saved in each checkpoint: run.json's copy
  state, extra, resumed = checkpointer.restore_or(
      job.programs.state_target(),
      lambda: job.programs.initial_state(job.initial_params, jax.random.fold_in(job.key, 3)),
      log=console)
  state = job.programs.placed_optimizer(state, host=True)  # (rl.offload_optimizer)
  if job.ref_params is not job.initial_params:
    # the loaded params were only the first state's source (a cast or offloaded
    # reference is a copy): their device memory is freed for the rest of the run
    job.initial_params = None
  start = int(extra.get("step", 0)) if resumed else 0
  if start > r.total_steps and is_main_process():
    console(f"{workdir} holds step {start}, past config.rl.total_steps={r.total_steps}: "
            f"nothing to train; the export and summary are of step {start}.")
  if is_main_process():
    drop_steps_after(workdir / "samples.jsonl", start)  # as MetricWriter does for metrics
  failures = search.FailingSteps.from_config(config.engine)

  def extra_at(at: int) -> dict:  # what a checkpoint at step `at` keeps besides the state
    return {"step": at, "algorithm": r.algorithm, "seed": config.seed,
            "schedule_steps": r.horizon, "inputs": inputs,
            "data_position": at * r.prompts_per_step,
            **({"record": record} if record else {})}

  last, done, step = {}, start, start  # done: the last step whose state and metrics are complete
  try:
    with MetricWriter(workdir, resume_from=start) as writer, tqdm(
        total=r.total_steps, initial=min(start, r.total_steps), desc=f"rl/{r.algorithm}",
        unit="step", disable=not is_main_process() or not config.progress) as bar:
      while step < r.total_steps:
        # a signal lands between steps: the step under way finishes (rollout, update,
        # metrics) and the interrupt path below saves it; a second signal stops it at once
        with checkpointer.step_body("RL", step + 1):
          step += 1
          state, metrics, samples = train_step(job, state, step)
          if r.sample_every and step % r.sample_every == 0 and is_main_process():
            write_samples(job, step, *samples)  # before the write: a NaN step keeps its samples
          try:
            last = writer.write(step, metrics)
          except FloatingPointError as e:
            checkpointer.close()  # an asynchronous save in flight lands before it is named
            raise FloatingPointError(
                f"RL step {step}: {e} The update was not applied; the last checkpoint: "
                f"{checkpointer.latest()}. Lower config.rl.learning_rate or check the "
                "rewards.") from None
          failures.observe(step, last["rollout/failed_share"], job.engine.last_error,
                           log=console if is_main_process() else None)
          bar.set_postfix({"reward": f"{last['reward/train']:.3f}",
                           "p_noise": f"{last['curriculum/p_noise']:.3f}"}, refresh=False)
          bar.update(1)
          done = step
          if step % ck.every == 0 or step == r.total_steps:
            checkpointer.save(step, state, extra=extra_at(step))
  except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (zsjax.interrupts)
    checkpointer.close_on_interrupt(e, "RL", step, done, state, extra_at, console)
    raise
  except search.EngineError as e:
    checkpointer.close()
    step_ = checkpointer.latest_step()  # the error's sentence ends "... to resume"
    where = f"checkpoint step {step_}" if step_ is not None else \
        "the beginning (no checkpoint was saved yet)"
    raise search.EngineError(f"{e} from {where}.") from None
  except BaseException:
    checkpointer.close()  # a save in flight completes whatever stopped the loop
    raise
  checkpointer.close()
  if not last and done:  # a rerun of a finished run trains nothing: keep the last metrics
    last = metrics_at(workdir, done)
  summary = {"final_step": done, "resumed_from": start, **last}
  if ck.export_hf and is_main_process():
    export = export_hf(workdir / "hf_export", job.policy_cfg, state.policy.params, job.tokenizer,
                       prompt_format={"chat_template": config.data.chat_template,
                                      "instruction": template.instruction_of(
                                          config.data.prompt_style, config.data.instruction),
                                      "style": config.data.prompt_style})
    summary["hf_export"] = str(export)
  if is_main_process():
    (workdir / "rl_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config = tinyworld.fill_missing_data(config, workdir, "data", "train_files",
                                       lambda world: world["train"])
  return train(setup(config, workdir))


__all__ = ["RLJob", "setup", "rollout_batch", "roll_out", "train_step", "write_samples", "train", "run"]
