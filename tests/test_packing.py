"""Padding-free rows (zsjax.packing, rl.pack_tokens): the packed layout, and packed
scoring and updates equal to the padded ones."""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from config_files import load_config
from zsjax import model as M
from zsjax import packing, rl_settings, rl_step
from zsjax import sharding as S

CFG = M.ModelConfig(vocab_size=61, embed_dim=24, mlp_dim=40, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=6, arch="qwen2", qkv_bias=True)


def test_first_fit_decreasing_places_every_token_once():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 30, 40)
  layout = packing.pack(lengths, 32, multiple=4)
  assert layout.rows % 4 == 0 and layout.rows < len(lengths)
  segment = layout.segment_ids()
  assert (segment != 0).sum() == lengths.sum()  # nothing overlaps, nothing is lost
  for r in range(layout.rows):  # each row: whole trajectories, in order, within the width
    placed = np.flatnonzero(layout.row == r)
    assert lengths[placed].sum() <= 32
  values = rng.normal(size=(40, 30)).astype(np.float32)
  held = np.arange(30)[None] < lengths[:, None]
  back = layout.gather(layout.scatter(values), 30)
  np.testing.assert_array_equal(back, np.where(held, values, 0))
  positions = layout.positions()
  i = int(np.argmax(lengths))
  np.testing.assert_array_equal(
      positions[layout.row[i], layout.offset[i]:layout.offset[i] + lengths[i]],
      np.arange(lengths[i]))
  assert 0.5 < layout.fill <= 1.0
  with pytest.raises(ValueError, match="pack_tokens must be at least"):
    packing.pack([5, 40], 32)


def test_packed_log_probs_are_the_padded_ones():
  params = M.init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(1)
  lengths = rng.integers(3, 17, 9)
  tokens = rng.integers(0, CFG.vocab_size, (9, 16)).astype(np.int32)
  held = (np.arange(16)[None] < lengths[:, None]).astype(np.int32)
  padded = M.token_log_probs(CFG, params, jnp.asarray(tokens), jnp.asarray(held),
                             with_entropy=True)
  layout = packing.pack(lengths, 40)
  packed = M.token_log_probs(CFG, params, jnp.asarray(layout.scatter(tokens)),
                             jnp.asarray(layout.segment_ids()), jnp.asarray(layout.positions()),
                             with_entropy=True)
  for a, b in zip(packed, padded):
    np.testing.assert_allclose(layout.gather(np.asarray(a), 16), np.asarray(b), atol=2e-5)


def _traj(n, s, seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(s // 2, s + 1, n)
  prompt = np.full(n, 3)
  held = np.arange(s)[None] < lengths[:, None]
  return types.SimpleNamespace(
      tokens=np.where(held, rng.integers(0, CFG.vocab_size, (n, s)), 0).astype(np.int32),
      loss_mask=(held & (np.arange(s)[None] >= prompt[:, None])).astype(np.int32),
      lengths=lengths, prompt_lengths=prompt), rng.random(n).astype(np.float32)


def _one_step(algorithm: str, params, traj, rewards, **rl_fields):
  """One RL step (scoring, advantages, updates) of the tiny zerosearch config with
  ``rl_fields`` on one device: ``(host batch, host new state, metrics, scoring calls)``,
  the calls counted on the program that scores log-probs (padded or packed)."""
  plan = S.ShardingPlan(S.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
                        S.rules_for("dp"), "dp")
  section = load_config("zerosearch", f"tiny,{algorithm}").rl
  section.update(prompts_per_step=4, samples_per_prompt=4, micro_batch_size=4,
                 score_batch_size=4, kl_coef=0.1, learning_rate=1e-2, **rl_fields)
  r = rl_settings.RLSettings.from_config(section).check()
  programs = rl_step.build_programs(r, CFG, plan, 1.0)
  calls = []
  name = "packed_log_probs" if r.pack_tokens else "log_probs"
  inner = getattr(programs, name)
  programs = dataclasses.replace(programs, **{name: lambda *a: calls.append(1) or inner(*a)})
  state = programs.initial_state(params, jax.random.key(0))
  batch = rl_step.make_rl_batch(programs, state, programs.reference_params(params), traj,
                                rewards)
  new, metrics = rl_step.update_epochs(programs, state, batch, np.random.default_rng(1),
                                       jax.random.key(3))
  return jax.device_get(batch), jax.device_get(new), jax.device_get(metrics), len(calls)


@pytest.mark.parametrize("algorithm,aggregation", [("grpo", "seq_mean_token_mean"),
                                                   ("ppo", "token_mean")])
def test_a_packed_step_equals_the_padded_step(algorithm, aggregation):
  """Scoring (reference, old log-probs, PPO values), advantages, and two updates
  (two minibatches) of a packed step equal the padded step's: the same loss and
  metrics, and parameters equal to float32 rounding."""
  params = M.init_params(CFG, jax.random.key(2))
  traj, rewards = _traj(16, 20, 3)
  step = functools.partial(_one_step, algorithm, params, traj, rewards, minibatch_size=8,
                           aggregation=aggregation)
  batch, state, metrics, _ = step(pack_tokens=0)
  batch2, state2, metrics2, _ = step(pack_tokens=48)  # about two trajectories a row
  for name in ("old_logp", "ref_logp", "old_values", "advantages", "returns"):
    np.testing.assert_allclose(getattr(batch2, name), getattr(batch, name), atol=2e-5,
                               err_msg=name)
  assert len(metrics2) == len(metrics) == 2
  for m2, m in zip(metrics2, metrics):
    assert set(m2) == set(m)
    for key in m:
      assert m2[key] == pytest.approx(m[key], rel=2e-4, abs=2e-6), key
  for policy_or_critic in ("policy", "critic"):
    a, b = getattr(state2, policy_or_critic), getattr(state, policy_or_critic)
    if b is None:
      continue
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
      np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4)
    assert not all(np.array_equal(x, y) for x, y in zip(
        jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(params)))  # it moved


@pytest.mark.parametrize("algorithm,pack_tokens", [("reinforce", 48), ("grpo", 0)])
def test_a_step_without_the_old_logp_pass_equals_the_step_with_it(algorithm, pack_tokens):
  """rl.old_logp_pass=False (one update a step): no scoring pass for the old
  log-probs, the update's own held fixed instead. The same loss, metrics and new
  parameters as with the pass (float32 rounding apart), a ratio of exactly 1, and
  the policy's log-probs scored once (the reference's pass only)."""
  params = M.init_params(CFG, jax.random.key(4))
  traj, rewards = _traj(16, 20, 5)
  step = functools.partial(_one_step, algorithm, params, traj, rewards, minibatch_size=16,
                           epochs=1, pack_tokens=pack_tokens)
  _, new, metrics, calls = step(old_logp_pass=True)
  _, new2, metrics2, calls2 = step(old_logp_pass=False)
  new, new2 = new.policy.params, new2.policy.params
  assert calls2 >= 1 and calls == 2 * calls2  # the reference's pass and the policy's, or one
  assert len(metrics) == len(metrics2) == 1
  assert metrics2[0]["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and metrics2[0]["loss/clip_frac"] == 0.0
  for key in metrics[0]:
    assert metrics2[0][key] == pytest.approx(metrics[0][key], rel=2e-4, abs=2e-6), key
  for x, y in zip(jax.tree_util.tree_leaves(new2), jax.tree_util.tree_leaves(new)):
    np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4)
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(new),
                                                       jax.tree_util.tree_leaves(params)))


@pytest.mark.parametrize("fields,match", [
    (dict(epochs=2), "make 2"), (dict(minibatch_size=8), "make 2"),
    (dict(algorithm="ppo"), "PPO reads the old log-probs")])
def test_old_logp_pass_off_is_refused_where_the_old_log_probs_are_not_the_updates(fields, match):
  section = load_config("zerosearch", "tiny").rl
  section.update(prompts_per_step=4, samples_per_prompt=4, minibatch_size=16, epochs=1,
                 micro_batch_size=4, score_batch_size=4, old_logp_pass=False)
  section.update(**fields)
  with pytest.raises(ValueError, match=f"config.rl.old_logp_pass=False.*{match}"):
    rl_settings.RLSettings.from_config(section).check()


def test_pack_tokens_narrower_than_the_context_is_named():
  config = load_config("zerosearch", "tiny")
  config.rl.pack_tokens = config.rollout.max_length - 1
  with pytest.raises(ValueError, match=r"config.rl.pack_tokens=511 must be 0 .* or at least "
                                       r"config.rollout.max_length=512"):
    rl_settings.check_config(config)


def test_packing_benchmark_writes_its_table_and_summary(tmp_path):
  import sys
  from pathlib import Path

  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
  import bench_packing

  summary = bench_packing.main(["--cases=tiny", "--rows=8", "--repeats=1",
                                f"--out={tmp_path}"])
  case = summary["cases"]["tiny"]
  assert case["fill_packed"] > case["fill_padded"]  # packing removes padding
  assert all(case[k][t] > 0 for k in ("padded", "packed") for t in ("score", "update"))
  assert "| tiny | 8 x 384 |" in (tmp_path / "bench_packing.md").read_text()
  assert summary["environment"]["packages"]["jax"]
