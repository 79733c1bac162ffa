"""The RL loop: its pieces against independent computations, and whole runs on a
tiny random model (TensorBoard events, checkpoints, HF export, exact resume after
a kill, a NaN stop that saves nothing corrupt)."""

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zsjax import data
from zsjax import model as M
from zsjax import rewards, rl, rl_settings, rl_step
from zsjax import train_rl
from zsjax import train_step as TS
from zsjax.metrics import read_jsonl
from zsjax.sharding import ShardingPlan

from config_files import load_config

ROOT = Path(__file__).resolve().parents[1]
CFG = M.ModelConfig(vocab_size=61, embed_dim=24, mlp_dim=40, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=6, arch="qwen2", qkv_bias=True)


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_log_probs_temperature_and_entropy_match_numpy():
  params = M.init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (3, 11)).astype(np.int32)
  segment = np.ones((3, 11), np.int32)
  segment[1, 7:] = 0  # padding
  logp, ent = M.token_log_probs(CFG, params, jnp.asarray(tokens), jnp.asarray(segment),
                                temperature=0.7, with_entropy=True)
  logits = np.asarray(M.Transformer(CFG).apply({"params": params}, jnp.asarray(tokens),
                                               segment_ids=jnp.asarray(segment)), np.float64)
  lp = log_softmax(logits / 0.7)
  want = np.zeros((3, 11))
  want_ent = np.zeros((3, 11))
  for b in range(3):
    for t in range(1, 11):
      if segment[b, t]:
        want[b, t] = lp[b, t - 1, tokens[b, t]]
        want_ent[b, t] = -(np.exp(lp[b, t - 1]) * lp[b, t - 1]).sum()
  np.testing.assert_allclose(np.asarray(logp), want, atol=2e-5)
  np.testing.assert_allclose(np.asarray(ent), want_ent, atol=2e-5)


@pytest.mark.parametrize("algorithm", ["reinforce", "grpo", "ppo"])
def test_advantages_put_the_reward_on_the_last_policy_token(algorithm):
  mask = np.array([[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0],
                   [0, 0, 0, 0, 0, 0]], np.float32)
  rewards = np.array([1.0, 0.5, 0.0, 2.0], np.float32)
  groups = np.array([0, 0, 1, 1])
  old = np.linspace(-2, -1, 24, dtype=np.float32).reshape(4, 6)
  ref = old - 0.1
  values = np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 6) * mask
  adv, returns, token_rewards = rl.advantages_and_returns(
      algorithm, jnp.asarray(rewards), jnp.asarray(mask), jnp.asarray(groups), jnp.asarray(old),
      jnp.asarray(ref), jnp.asarray(values), kl_coef=0.1)
  last = np.zeros((4, 6))
  last[0, 4], last[1, 3], last[2, 1] = 1.0, 0.5, 0.0  # row 3 has no policy token: no reward
  if algorithm == "reinforce":
    np.testing.assert_allclose(adv, rewards[:, None] * mask)
    np.testing.assert_allclose(token_rewards, last)
  elif algorithm == "grpo":
    # groups {1.0, 0.5} and {0.0, 2.0}: (r - mean) / (unbiased std + 1e-6)
    z = np.array([0.25, -0.25, -1.0, 1.0]) / (np.array([0.5, 0.5, 2.0, 2.0]) / np.sqrt(2) + 1e-6)
    np.testing.assert_allclose(adv, z[:, None] * mask, rtol=1e-5)
  else:
    want_rewards = last - 0.1 * 0.1 * mask  # k1 = old - ref = 0.1 on every policy token
    np.testing.assert_allclose(token_rewards, want_rewards, atol=1e-6)
    # gamma = lambda = 1: return = reward-to-go over the row's policy tokens
    want_returns = np.zeros((4, 6))
    for b in range(4):
      acc = 0.0
      for t in reversed(range(6)):
        if mask[b, t]:
          acc += want_rewards[b, t]
          want_returns[b, t] = acc
    np.testing.assert_allclose(returns, want_returns, atol=1e-6)
    raw = (want_returns - values) * mask
    mean = raw.sum() / mask.sum()
    std = np.sqrt((((raw - mean) * mask) ** 2).sum() / (mask.sum() - 1))
    np.testing.assert_allclose(adv, (raw - mean) / std * mask, rtol=1e-4, atol=1e-5)


def test_accumulated_update_equals_one_batch_on_eight_devices():
  plan = ShardingPlan.from_config({"mesh": {"data": -1}, "sharding": "dp",
                                   "sharding_rules": ()})
  tx, _ = TS.make_optimizer(1e-2, 10)
  rng = np.random.default_rng(1)
  m, length = 32, 9
  batch = {"tokens": rng.integers(0, CFG.vocab_size, (m, length)).astype(np.int32),
           "segment_ids": np.ones((m, length), np.int32),
           "loss_mask": (rng.random((m, length)) < 0.6).astype(np.int32),
           "old_logp": -rng.random((m, length)).astype(np.float32),
           "advantages": rng.normal(size=(m, length)).astype(np.float32)}
  batch["loss_mask"][:, 0] = 0

  def objective(params, mb, normalizer, rng):
    del rng
    logp = M.token_log_probs(CFG, params, mb["tokens"], mb["segment_ids"])
    return rl.policy_loss(logp, mb["old_logp"], mb["old_logp"], mb["advantages"],
                          mb["loss_mask"], kl_coef=0.1, normalizer=normalizer)

  shardings = {k: plan.rows(2) for k in batch}
  results = []
  for micro in (None, 8):  # one pass over 32 rows; 4 micro-batches of 8
    state, state_sh = TS.create_train_state(CFG, tx, plan, rng=jax.random.key(3))
    update = TS.make_accumulating_update(objective, tx, plan, state_sh, shardings, micro)
    state, metrics = update(state, jax.device_put(batch, shardings), jax.random.key(0))
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (p1, m1), (p4, m4) = results
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p4)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  for key in ("loss/total", "loss/pg", "loss/kl", "optim/grad_norm"):
    np.testing.assert_allclose(m1[key], m4[key], rtol=2e-5, err_msg=key)


def test_answers_are_read_from_policy_tokens_only():
  from zsjax.template import INVALID_ACTION_FEEDBACK

  class Tok:  # a character-level stand-in: token id = code point
    def decode(self, ids, skip_special_tokens=True):
      return "".join(map(chr, ids))

  def row(parts):
    ids = [ord(c) for text, _ in parts for c in text]
    mask = [m for text, m in parts for _ in text]
    return ids, mask

  rows = [row([("Q? ", 0), ("<answer> Paris </answer>", 1)]),
          # the feedback message (inserted, mask 0) names the tags: no answer here
          row([("Q? ", 0), ("<search> x </answer>", 1), (INVALID_ACTION_FEEDBACK, 0)]),
          # the prompt's example answer is not the response's
          row([("e.g. <answer> Lisbon </answer> Q? ", 0), ("no idea", 1)])]
  width = max(len(ids) for ids, _ in rows)
  tokens = np.zeros((3, width), np.int64)
  mask = np.zeros((3, width), np.int32)
  for i, (ids, m) in enumerate(rows):
    tokens[i, :len(ids)], mask[i, :len(m)] = ids, m

  class Traj:
    pass

  traj = Traj()
  traj.tokens, traj.loss_mask = tokens, mask
  scores = rewards.score_answers(Tok(), traj, [["Paris"], ["and"], ["Lisbon"]], "f1")
  np.testing.assert_array_equal(scores.has_answer, [1, 0, 0])
  np.testing.assert_array_equal(scores.train, [1, 0, 0])


def test_bad_settings_name_the_field():
  config = load_config("zerosearch", "tiny")
  config.rl.minibatch_size = 3
  micro = config.rl.micro_batch_size
  with pytest.raises(ValueError, match=re.escape(
      f"config.rl.minibatch_size=3 is not a multiple of config.rl.micro_batch_size={micro}")):
    rl_settings.check_config(config)
  config = load_config("zerosearch", "tiny")
  config.rl.algorithm = "dpo"
  with pytest.raises(ValueError, match="config.rl.algorithm='dpo'"):
    rl_settings.check_config(config)
  for field, value, needle in (
      ("rl.learning_rate", -1e-6, "config.rl.learning_rate=-1e-06 must be > 0"),
      ("checkpoint.every", 0, "config.checkpoint.every=0 must be >= 1"),
      ("rl.prompts_per_step", 0, "config.rl.prompts_per_step=0 must be a positive"),
      ("engine.max_failed_share", 2.0, "config.engine.max_failed_share=2.0"),
      ("rollout.dtype", "fp8", "config.rollout.dtype='fp8' is not 'float32', 'bfloat16'"),
      ("rl.scoring_dtype", "int8", "config.rl.scoring_dtype='int8' is not 'float32'"),
      ("sampling.method", "beam", "config.sampling.method='beam' is not one of"),
      ("simulator.sampling_method", "top1", "config.simulator.sampling_method='top1'"),
      # checked before any model is built (issue 30 items 11, 12)
      ("rl.kl_type", "k4", "config.rl.kl_type='k4' is not one of ('k1', 'k2', 'k3')"),
      ("rl.aggregation", "sum", "config.rl.aggregation='sum' is not one of"),
      ("rl.entropy_coef", -0.01, "config.rl.entropy_coef=-0.01 must be >= 0"),
      ("rl.weight_decay", -0.1, "config.rl.weight_decay=-0.1 must be >= 0"),
      ("rl.dual_clip", 0.5, "config.rl.dual_clip=0.5 must be > 1"),
      ("data.limit", -1, "config.data.limit=-1 must be >= 0")):
    config = load_config("zerosearch", "tiny")
    section, name = field.split(".")
    config[section][name] = value  # every knob is a field of the file
    with pytest.raises(ValueError, match=re.escape(needle)):
      rl_settings.check_config(config)
  # a negative KL coefficient is the reference's sign, one config line away (docs/fidelity.md)
  config = load_config("zerosearch", "tiny")
  config.rl.kl_coef = -0.001
  assert rl_settings.check_config(config).kl_coef == -0.001
  # 4 x 2 = 8 trajectories in minibatches of 6 leave a last one of 2, which a
  # micro-batch of 3 cannot split: the message names minibatch_size, and the fix
  config = load_config("zerosearch", "tiny")
  config.rl.minibatch_size, config.rl.micro_batch_size = 6, 3
  with pytest.raises(ValueError, match=re.escape(
      "config.rl.minibatch_size=6 does not divide the 8 trajectories of a step (4 x 2): the "
      "last minibatch holds 2, which config.rl.micro_batch_size=3 does not divide. Use a "
      "minibatch_size that divides 8, or a micro_batch_size of 2")):
    rl_settings.check_config(config)


# ------------------------------------------------------------ whole runs


def tiny_config(algorithm="reinforce", steps=3, **engine):
  config = load_config("zerosearch", f"tiny,{algorithm}")
  config.progress = False
  config.rl.total_steps = steps
  config.rollout.max_new_tokens = 12
  config.rollout.max_turns = 1
  config.simulator.max_new_tokens = 12
  config.checkpoint.async_save = False
  config.engine.update(engine)
  return config


def with_world(config, world):
  config.synthetic_data = False
  config.data.train_files = world["train"]
  config.tokenizer = world["tokenizer"]
  config.engine.corpus = world["corpus"]
  return config


def comparable(records):
  return [{k: v for k, v in r.items() if not k.startswith(("time", "perf/"))} for r in records]


# Slow (-m slow): its short siblings in the default run are
# test_interrupted_resumed_and_mismatched_runs_keep_the_workdir_whole here and
# tests/test_metrics_checkpoint.py::test_resume_equals_an_uninterrupted_run.
@pytest.mark.slow
def test_run_writes_events_checkpoints_export_and_resumes_exactly_after_a_kill(tmp_path,
                                                                             world):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  from zsjax.checkpoint import Checkpointer

  config = with_world(tiny_config(steps=3), world)
  full = tmp_path / "full"
  summary = train_rl.run(config, str(full))
  records = read_jsonl(full / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2, 3]
  assert summary["final_step"] == 3
  for r in records:
    assert 0.0 <= r["reward/f1"] <= 1.0 and r["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
  p = [r["curriculum/p_noise"] for r in records]
  assert p[0] < p[1] < p[2] == pytest.approx(0.5)

  events = EventAccumulator(str(full / "tensorboard"))
  events.Reload()
  tags = events.Tags()["tensors"] + events.Tags()["scalars"]
  for name in ("reward/f1", "loss/kl", "curriculum/p_noise", "optim/grad_norm", "time/rollout_s"):
    assert name in tags, name
  assert Checkpointer(full / "checkpoints").all_steps() == [1, 2, 3]
  from zsjax import hf
  cfg, params = hf.load_checkpoint(full / "hf_export")
  assert cfg.num_layers == 2 and (full / "hf_export" / "tokenizer.json").exists()
  from zsjax.template import INSTRUCTION, load_prompt_format
  assert load_prompt_format(full / "hf_export") == {"chat_template": config.data.chat_template,
                                                    "instruction": INSTRUCTION,
                                                    "style": "zsjax"}

  # The same run killed (SIGKILL) in the middle of step 3, then started again.
  resumed = tmp_path / "resumed"
  overrides = [f"--config.data.train_files={world['train']}",
               f"--config.tokenizer={world['tokenizer']}", "--config.synthetic_data=False",
               "--config.progress=False", "--config.rl.total_steps=3",
               "--config.rollout.max_new_tokens=12", "--config.rollout.max_turns=1",
               "--config.simulator.max_new_tokens=12", "--config.checkpoint.async_save=False"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  killed = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_at_step.py"), "3",
                           "--config=configs/zerosearch.py:tiny", f"--workdir={resumed}",
                           *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert Checkpointer(resumed / "checkpoints").latest_step() == 2
  train_rl.run(config, str(resumed))
  assert comparable(read_jsonl(resumed / "metrics.jsonl")) == comparable(records)
  _, back = hf.load_checkpoint(resumed / "hf_export")
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(a, b)


def test_nan_loss_stops_naming_step_and_metric_and_saves_nothing_corrupt(tmp_path, world,
                                                                         monkeypatch):
  from zsjax.checkpoint import Checkpointer

  config = with_world(tiny_config(steps=3), world)
  calls = []

  def nan_rewards_at_step_2(*args, **kwargs):  # the step's rewards turn NaN at step 2
    scores = rewards.score_answers(*args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
      scores = dataclasses.replace(scores, train=np.full_like(scores.train, np.nan))
    return scores

  monkeypatch.setattr(train_rl, "score_answers", nan_rewards_at_step_2)
  job = train_rl.setup(config, tmp_path)
  with pytest.raises(FloatingPointError, match=r"RL step 2: .*loss/.*the last checkpoint: step 1\."):
    train_rl.train(job)
  checkpointer = Checkpointer(tmp_path / "checkpoints")
  assert checkpointer.all_steps() == [1]
  state, extra = checkpointer.restore(job.programs.state_target())
  assert extra["step"] == 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state))


def test_interrupted_resumed_and_mismatched_runs_keep_the_workdir_whole(tmp_path, world,
                                                                       monkeypatch, capsys,
                                                                       caplog):
  """SIGTERM while an asynchronous save is written: the save completes and the message
  names it; Ctrl-C raised inside a step: the last complete checkpoint stands; a resume
  under another algorithm is refused before Orbax reads a tree; a resume with fewer
  steps reports the step its export holds; an overlong question is skipped when the
  data loads, named by file and row."""
  import datasets
  from zsjax.checkpoint import Checkpointer

  rows = datasets.Dataset.from_parquet(world["train"]).to_list()[:12]
  rows[4] = dict(rows[4], question="word " * 300 + "?")
  train_file = tmp_path / "train.jsonl"
  data.write_jsonl(train_file, rows)
  config = with_world(tiny_config(steps=3), world)
  config.data.train_files = str(train_file)
  config.checkpoint.update(async_save=True, export_hf=True)
  with caplog.at_level(logging.WARNING):
    job = train_rl.setup(config, tmp_path / "run")
  assert len(job.data) == 11 and "word" not in " ".join(job.data["question"][:5])
  assert "train.jsonl, row 5: field 'question' makes a prompt of" in caplog.text
  # SIGTERM (a scheduler's stop) while step 2's save is being written: the save
  # finishes, the message names it, nothing after it runs
  import signal
  import orbax.checkpoint as ocp
  from zsjax import interrupts
  manager_save, previous = ocp.CheckpointManager.save, signal.getsignal(signal.SIGTERM)

  def terminated_in_save_2(self, step, *args, **kwargs):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return manager_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", terminated_in_save_2)
  interrupts.install()
  try:
    with pytest.raises(interrupts.Terminated):
      train_rl.train(job)
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert ("stopped by SIGTERM after RL step 2; the last complete checkpoint: step 2. Rerun"
          in capsys.readouterr().err)
  assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [1, 2]
  monkeypatch.setattr(ocp.CheckpointManager, "save", manager_save)
  step_of = train_rl.train_step

  def interrupted_at_3(job_, state, step):
    if step == 3:
      raise KeyboardInterrupt
    return step_of(job_, state, step)

  monkeypatch.setattr(train_rl, "train_step", interrupted_at_3)
  with pytest.raises(KeyboardInterrupt):
    train_rl.train(job)
  assert "the last complete checkpoint: step 2. Rerun" in capsys.readouterr().err
  assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [1, 2]
  monkeypatch.setattr(train_rl, "train_step", step_of)

  config.rl.total_steps = 1  # fewer steps than the workdir holds: nothing to train
  with pytest.raises(ValueError, match=r"span 3 steps \(checkpoint step 2\); this one would lay "
                                       r"them over 1 .*--config.rl.schedule_steps=3"):
    train_rl.train(dataclasses.replace(
        job, config=config, settings=rl_settings.RLSettings.from_config(config.rl)))
  config.rl.schedule_steps = 3  # the checkpoint's schedules, whatever run.json says
  summary = train_rl.train(dataclasses.replace(
      job, config=config, settings=rl_settings.RLSettings.from_config(config.rl)))
  assert summary["final_step"] == 2 and "past config.rl.total_steps=1" in capsys.readouterr().err
  # the summary of a rerun that trained nothing still holds the last step's metrics
  metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert metrics[-1]["step"] == 2 and summary["reward/train"] == metrics[-1]["reward/train"]

  ppo = with_world(tiny_config("ppo", steps=3), world)
  ppo.data.train_files = str(train_file)
  with pytest.raises(ValueError, match=r"holds a 'reinforce' run \(checkpoint step 2\); "
                                       r"config.rl.algorithm='ppo'"):
    train_rl.train(dataclasses.replace(
        job, config=ppo, settings=rl_settings.RLSettings.from_config(ppo.rl)))

  config.data.on_error = "raise"
  with pytest.raises(data.DataError, match=r"train.jsonl, row 5: field 'question' makes a prompt "
                                           r"of \d+ tokens, more than "
                                           r"config.rollout.max_prompt_tokens"):
    train_rl.setup(config, tmp_path / "other")


def test_sigterm_finishes_the_rl_step_under_way_and_saves_it(tmp_path, world, monkeypatch,
                                                            sigterm_raises, capsys):
  """A SIGTERM during step 1, with no periodic save till the end: step 1 finishes and is
  saved, so the rerun resumes from it and ends where the uninterrupted run ends."""
  import signal

  from zsjax import interrupts
  from zsjax.checkpoint import Checkpointer

  config = with_world(tiny_config(steps=2), world)
  config.checkpoint.update(every=1000, export_hf=False)
  whole = train_rl.run(config, str(tmp_path / "whole"))
  step_of = train_rl.train_step

  def signalled_in_1(job_, state, step):
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return step_of(job_, state, step)

  monkeypatch.setattr(train_rl, "train_step", signalled_in_1)
  with pytest.raises(interrupts.Terminated):
    train_rl.run(config, str(tmp_path / "killed"))
  err = capsys.readouterr().err
  assert "SIGTERM received; finishing RL step 1 (then saving it) first" in err
  assert "stopped by SIGTERM after RL step 1; the last complete checkpoint: step 1." in err
  assert Checkpointer(tmp_path / "killed" / "checkpoints").all_steps() == [1]
  monkeypatch.setattr(train_rl, "train_step", step_of)
  resumed = train_rl.run(config, str(tmp_path / "killed"))
  assert resumed["resumed_from"] == 1 and resumed["final_step"] == 2
  assert (comparable(read_jsonl(tmp_path / "killed" / "metrics.jsonl"))
          == comparable(read_jsonl(tmp_path / "whole" / "metrics.jsonl")))
  assert resumed["reward/train"] == whole["reward/train"]
  job = train_rl.setup(config, tmp_path / "whole")
  final = {}
  for name in ("whole", "killed"):
    checkpointer = Checkpointer(tmp_path / name / "checkpoints")
    final[name] = checkpointer.restore(job.programs.state_target(), 2)[0].policy.params
    checkpointer.close()
  for a, b in zip(jax.tree_util.tree_leaves(final["whole"]),
                  jax.tree_util.tree_leaves(final["killed"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("decay", ["constant", "cosine"])
def test_learning_rate_decay_reaches_the_optimizer(tmp_path, world, decay):
  config = with_world(tiny_config(steps=8), world)
  config.rl.warmup_fraction = 0.25
  config.rl.decay = decay
  programs = train_rl.setup(config, tmp_path).programs
  updates = 8 * len(programs.minibatch_sizes)
  lrs = [float(programs.schedule(i)) for i in range(updates + 1)]
  peak = config.rl.learning_rate
  assert max(lrs) == pytest.approx(peak)
  if decay == "constant":
    assert lrs[-1] == pytest.approx(peak)
  else:  # cosine from the end of the warmup to 0 at the last update
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[-2] < lrs[updates // 2] < peak


# GRPO against BM25 is slow (-m slow): the default run has GRPO's packed step
# (tests/test_packing.py) and RL against BM25 (the CI pipeline's rl_real_search).
@pytest.mark.parametrize("algorithm,engine", [pytest.param("grpo", "bm25", marks=pytest.mark.slow),
                                              ("ppo", "simulator")])
def test_other_algorithms_and_engines_run(tmp_path, world, algorithm, engine):
  config = with_world(tiny_config(algorithm, steps=2, kind=engine), world)
  config.checkpoint.export_hf = False
  config.rollout.max_turns = 2
  config.sampling.temperature = 1.5  # random models rarely close a tag; help them search
  train_rl.run(config, str(tmp_path))
  records = read_jsonl(tmp_path / "metrics.jsonl")
  assert len(records) == 2 and all(r["optim/skipped"] == 0.0 for r in records)
  # the first step compiles every phase's programs, inside the phase's wall time; the
  # second reuses them (time/*_compile_s: jax.monitoring's compile events)
  for phase in ("rollout", "score", "update"):
    first = records[0][f"time/{phase}_compile_s"]
    assert 0.0 < first <= records[0][f"time/{phase}_s"], phase
    assert records[1][f"time/{phase}_compile_s"] < first, phase
  if algorithm == "ppo":
    assert "critic/loss/total" in records[0] and "loss/value" in records[0]
  # the reference and policy differ after one update: the KL term is live
  assert records[1]["loss/kl"] > 0.0 or algorithm == "ppo"
  json.dumps(records)


# Slow (-m slow): the default run checks the same equality on one step
# (test_accumulated_update_equals_one_batch_on_eight_devices) and per layout
# (tests/test_sharding.py::test_preset_matches_single_device).
@pytest.mark.slow
def test_fsdp_run_matches_data_parallel_run(tmp_path, world):
  runs = {}
  for name, mesh, strategy in (("dp", dict(data=8, fsdp=1, tensor=1), "dp"),
                               ("fsdp_tp", dict(data=2, fsdp=2, tensor=2), "fsdp_tp")):
    config = with_world(tiny_config(steps=2), world)
    config.checkpoint.export_hf = False
    config.mesh.update(mesh)
    config.sharding = strategy
    train_rl.run(config, str(tmp_path / name))
    runs[name] = comparable(read_jsonl(tmp_path / name / "metrics.jsonl"))
  for a, b in zip(runs["dp"], runs["fsdp_tp"]):
    for key in ("reward/f1", "response/length", "rollout/turns", "response/policy_tokens"):
      assert a[key] == b[key], key
    for key in ("loss/policy", "loss/kl", "optim/grad_norm", "loss/entropy"):
      assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key


def test_waves_roll_out_the_same_rows_in_order(tmp_path, world):
  """config.rollout.waves: the step's prompts rolled out a share at a time, each wave
  keyed by its own rng. Greedy against BM25 (no randomness that matters), two waves
  give the trajectories of one, row for row, with the same gold answers and
  sources; waves that do not divide the prompts, or a wave that does not split over
  the mesh, are named before any work."""
  config = with_world(tiny_config(steps=1, kind="bm25"), world)
  config.sampling.kind = "greedy"
  config.rollout.max_turns = 2
  config.mesh.update(dict(data=4, fsdp=1, tensor=2))  # a wave's 4 rows split over 4
  config.rollout.share_prompt = True  # one wave: 4 prompts over 4, shared; two: each row's own
  job = train_rl.setup(config, tmp_path / "one")
  assert job.rollout_config.prompt_group == config.rl.samples_per_prompt
  rng = jax.random.key(4)
  one, golds, sources = train_rl.roll_out(job, job.initial_params, 1, rng)
  config.rollout.waves = 2
  job2 = train_rl.setup(config, tmp_path / "two")
  assert job2.rollout_config.prompt_group == 1
  two, golds2, sources2 = train_rl.roll_out(job2, job2.initial_params, 1, rng)
  assert (golds2, sources2) == (golds, sources)
  for name in ("tokens", "loss_mask", "lengths", "prompt_lengths", "turns", "searches",
               "answered"):
    np.testing.assert_array_equal(getattr(two, name), getattr(one, name), err_msg=name)
  np.testing.assert_allclose(two.log_probs, one.log_probs, atol=1e-5)
  assert one.tokens.shape[0] == config.rl.prompts_per_step * config.rl.samples_per_prompt
  config.rollout.waves = 3
  with pytest.raises(ValueError, match=r"config.rollout.waves=3 must be a whole number >= 1 "
                                       r"that divides config.rl.prompts_per_step=4"):
    rl_settings.check_config(config)
  config.rollout.waves = 4  # 1 prompt x 2 samples: 2 rows over 4
  with pytest.raises(ValueError, match=r"a wave of 1 prompts x 2 samples = 2 rows does not "
                                       r"split over data x fsdp = 4"):
    train_rl.setup(config, tmp_path / "four")
