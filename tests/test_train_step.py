"""The update step and its pieces, against independent computations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zsjax import model as M
from zsjax import sharding as S
from zsjax import train_step as T

CFG = M.ModelConfig(vocab_size=37, embed_dim=20, mlp_dim=28, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=6)


def one_device_plan():
  return S.ShardingPlan(S.make_mesh({"data": 1}, jax.devices()[:1]), S.rules_for("dp"), "dp")


def test_token_log_probs_match_numpy_log_softmax():
  params = M.init_params(CFG, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9)).astype(np.int32)
  segment = np.ones_like(tokens)
  segment[1, 6:] = 0
  got = np.asarray(M.token_log_probs(CFG, params, jnp.asarray(tokens), jnp.asarray(segment)))
  logits = np.asarray(M.Transformer(CFG).apply({"params": params}, jnp.asarray(tokens),
                                                segment_ids=jnp.asarray(segment)), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  want = np.zeros(tokens.shape)
  for b in range(2):
    for t in range(1, 9):
      if segment[b, t]:
        want[b, t] = logits[b, t - 1, tokens[b, t]] - logz[b, t - 1]
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.all(got[1, 6:] == 0) and np.all(got[:, 0] == 0)


def test_masked_tokens_get_exactly_zero_gradient():
  """Changing a token that is neither a target nor context before any target
  leaves the loss and gradient untouched; the loss is the token mean."""
  params = M.init_params(CFG, jax.random.key(1))
  tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 8)).astype(np.int32)
  mask = np.zeros((2, 8), np.int32)
  mask[:, 2:6] = 1  # targets 2..5; token 7 comes after every target
  batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda p, b: T.next_token_loss(CFG, p, b)[0]))
  loss, grad = loss_and_grad(params, batch)
  changed = tokens.copy()
  changed[:, 7] = (changed[:, 7] + 1) % CFG.vocab_size
  loss2, grad2 = loss_and_grad(params, {**batch, "tokens": jnp.asarray(changed)})
  assert float(loss) == float(loss2)
  jax.tree_util.tree_map(np.testing.assert_array_equal, grad, grad2)
  logp = M.token_log_probs(CFG, params, jnp.asarray(tokens))
  np.testing.assert_allclose(loss, -np.sum(np.asarray(logp) * mask) / mask.sum(), rtol=1e-6)


def test_learning_rate_schedule_warmup_then_constant():
  schedule = T.learning_rate_schedule(1e-3, total_steps=20, warmup_fraction=0.25)
  values = [float(schedule(i)) for i in range(8)]
  np.testing.assert_allclose(values[:5], [2e-4, 4e-4, 6e-4, 8e-4, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(values[5:], [1e-3] * 3, rtol=1e-6)
  cosine = T.learning_rate_schedule(1.0, total_steps=10, decay="cosine")
  np.testing.assert_allclose(float(cosine(5)), 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-6)
  with pytest.raises(ValueError, match="warmup_fraction=1.5"):
    T.learning_rate_schedule(1.0, 10, warmup_fraction=1.5)


def test_update_does_not_retrace_and_lowers_the_loss():
  plan = one_device_plan()
  tx, schedule = T.make_optimizer(3e-2, 50, warmup_fraction=0.1)
  state, shardings = T.create_train_state(CFG, tx, plan, rng=jax.random.key(2))
  rng = np.random.default_rng(3)
  fixed = {"tokens": rng.integers(0, CFG.vocab_size, (4, 10)).astype(np.int32),
           "loss_mask": np.ones((4, 10), np.int32)}
  update = T.make_update_step(functools.partial(T.next_token_loss, CFG), tx, plan, shardings,
                              plan.batch(fixed), schedule)
  losses = []
  for step in range(12):
    batch = fixed if step % 2 == 0 else {**fixed, "tokens": rng.integers(
        0, CFG.vocab_size, (4, 10)).astype(np.int32)}
    state, metrics = update(state, plan.put_batch(batch), jax.random.key(4))
    if step % 2 == 0:
      losses.append(float(metrics["loss/total"]))
  assert update._cache_size() == 1  # one compile for every batch of this shape
  assert int(state.step) == 12
  assert losses[-1] < 0.8 * losses[0], losses  # it learns the repeated batch
  np.testing.assert_allclose(float(metrics["optim/lr"]), 3e-2, rtol=1e-6)


def test_create_train_state_from_given_params_keeps_them():
  plan = one_device_plan()
  tx, _ = T.make_optimizer(1e-3, 10)
  params = M.init_params(CFG, jax.random.key(5))
  state, _ = T.create_train_state(CFG, tx, plan, params=params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, params)
  assert int(state.step) == 0
  with pytest.raises(ValueError, match="needs rng"):
    T.create_train_state(CFG, tx, plan)


def test_schedule_steps_keeps_a_longer_run_on_the_recorded_schedules():
  """rl.schedule_steps: a run taken past its recorded span keeps the learning rate
  and the noise curriculum of its first steps, and holds their end values after."""
  import ml_collections

  from config_files import load_config
  from zsjax import rl_settings, rl_step, rollout

  def get_config(arg):
    return load_config("zerosearch", arg)

  def programs_and_rollout(total, span):
    section = get_config("tiny").rl
    section.update(total_steps=total, schedule_steps=span, warmup_fraction=0.5,
                   decay="cosine")
    r = rl_settings.RLSettings.from_config(section).check()
    curriculum = ml_collections.ConfigDict(dict(kind="exponential", start=0.1, end=0.5,
                                                base=4.0, probability=0.5))
    return (rl_step.build_programs(r, CFG, one_device_plan(), 1.0),
            rollout.RolloutConfig.from_config(get_config("tiny").rollout, curriculum, r.horizon))

  short, short_rollout = programs_and_rollout(4, 0)
  longer, longer_rollout = programs_and_rollout(8, 4)
  moved, moved_rollout = programs_and_rollout(8, 0)
  updates = 4 * len(short.minibatch_sizes)
  lr = lambda p, i: float(p.schedule(i))
  assert [lr(longer, i) for i in range(updates + 1)] == [lr(short, i) for i in range(updates + 1)]
  assert lr(longer, 2 * updates) == lr(short, updates)  # the end value holds
  assert lr(moved, updates // 2) != lr(short, updates // 2)  # a re-based warmup differs
  p = lambda c, s: float(c.noise_probability(s))
  assert [p(longer_rollout, s) for s in range(5)] == [p(short_rollout, s) for s in range(5)]
  assert p(longer_rollout, 8) == p(short_rollout, 4) == 0.5
  assert p(moved_rollout, 2) < p(short_rollout, 2)


@pytest.mark.parametrize("tie,dtype", [(True, "float32"), (False, "float32"),
                                       pytest.param(True, "bfloat16", marks=pytest.mark.slow)])
def test_chunked_logits_give_the_same_log_probs_gradients_and_less_memory(tie, dtype):
  """ModelConfig.logits_chunk: the LM head in pieces (a chunk that does not divide
  the length, packed segments, a temperature) gives the unchunked log-probs,
  entropies and gradients, in float32 and bfloat16 compute; its compiled gradient
  needs far fewer temporaries."""
  import dataclasses

  cfg = dataclasses.replace(CFG, tie_embeddings=tie, dtype=dtype)
  tol = 1e-5 if dtype == "float32" else 2e-2
  params = M.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (3, 11), 0, cfg.vocab_size)
  segments = jnp.array([[1] * 11, [1] * 6 + [2] * 5, [1] * 8 + [0] * 3])
  chunked = dataclasses.replace(cfg, logits_chunk=4)

  def loss(c, p):
    logp, entropy = M.token_log_probs(c, p, tokens, segments, temperature=0.7,
                                      with_entropy=True)
    return jnp.sum(logp * 0.3 + entropy * 0.1), (logp, entropy)

  (_, (logp, entropy)), grads = jax.value_and_grad(loss, argnums=1, has_aux=True)(cfg, params)
  (_, (logp_c, entropy_c)), grads_c = jax.value_and_grad(loss, argnums=1, has_aux=True)(
      chunked, params)
  np.testing.assert_allclose(logp_c, logp, atol=tol)
  np.testing.assert_allclose(entropy_c, entropy, atol=tol)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_c)):
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), atol=tol)
  if dtype != "float32" or tie:  # the memory check once
    return

  big = dataclasses.replace(cfg, vocab_size=16384)  # the LM head dominates, not attention
  shapes = M.param_shapes(big)
  batch = jax.ShapeDtypeStruct((2, 256), jnp.int32)

  def temporaries(chunk):
    c = dataclasses.replace(big, logits_chunk=chunk)
    step = jax.jit(jax.grad(lambda p, t: jnp.sum(M.token_log_probs(c, p, t))))
    return step.lower(shapes, batch).compile().memory_analysis().temp_size_in_bytes

  whole = 2 * 255 * 16384 * 4  # one float32 logits array of the batch
  assert temporaries(0) > 2 * whole and temporaries(32) < temporaries(0) / 3


def test_a_bad_logits_chunk_is_named():
  import dataclasses

  with pytest.raises(ValueError, match=r"logits_chunk=-1 must be an integer >= 0.*"
                                       r"config.policy.logits_chunk"):
    dataclasses.replace(CFG, logits_chunk=-1)


@pytest.mark.parametrize("field,value,needle", [
    ("weight_decay", -0.1, r"config.sft.weight_decay=-0.1 must be >= 0"),
    ("grad_clip", -1.0, r"config.sft.grad_clip=-1.0 must be >= 0"),
    ("warmup_fraction", 1.5, r"config.sft.warmup_fraction=1.5 must lie in \[0, 1\]"),
    ("learning_rate", 0.0, r"config.sft.learning_rate=0.0 must be > 0"),
])
def test_bad_sft_settings_name_the_field_before_any_work(field, value, needle):
  from config_files import load_config
  from zsjax import train_sft

  config = load_config("sim_tuning", "sft")
  train_sft.check_config(config)  # the config as shipped passes
  config.sft[field] = value
  with pytest.raises(ValueError, match=needle):
    train_sft.check_config(config)


def test_a_finished_runs_summary_keeps_its_last_metrics(tmp_path):
  # what a rerun that trains nothing (SFT and RL) puts in its summary
  from zsjax.metrics import MetricWriter, metrics_at

  with MetricWriter(tmp_path) as writer:
    for step in (1, 2):
      writer.write(step, {"loss/nll": 1.0 / step})
  assert metrics_at(tmp_path, 2) == {"loss/nll": 0.5}
  assert metrics_at(tmp_path, 7) == {} and metrics_at(tmp_path / "none", 1) == {}


def test_reference_in_bfloat16_and_offloaded_states_give_the_same_step():
  """rl.offload_reference / rl.offload_optimizer keep the reference and the optimizer
  state in host memory between the phases that use them: the step is the same, bit
  for bit. rl.reference_dtype=bfloat16 stores the reference in half precision: its
  log-probs follow the float32 reference's within bf16 rounding."""
  import types

  from config_files import load_config
  from zsjax import rl_settings, rl_step

  plan = one_device_plan()
  params = M.init_params(CFG, jax.random.key(2))
  n, s = 8, 12
  rng = np.random.default_rng(0)
  lengths = rng.integers(6, s + 1, n)
  prompt = np.full(n, 3)
  held = np.arange(s)[None] < lengths[:, None]
  traj = types.SimpleNamespace(
      tokens=np.where(held, rng.integers(0, CFG.vocab_size, (n, s)), 0).astype(np.int32),
      loss_mask=(held & (np.arange(s)[None] >= prompt[:, None])).astype(np.int32),
      lengths=lengths, prompt_lengths=prompt)
  rewards = rng.random(n).astype(np.float32)

  def step(**fields):
    section = load_config("zerosearch", "tiny,grpo").rl
    section.update(prompts_per_step=2, samples_per_prompt=4, minibatch_size=8,
                   micro_batch_size=8, score_batch_size=8, kl_coef=0.1, **fields)
    r = rl_settings.RLSettings.from_config(section).check()
    r.check_memory(jax.devices())
    programs = rl_step.build_programs(r, CFG, plan, 1.0)
    state = programs.initial_state(params, jax.random.key(0))
    ref = programs.reference_params(params)
    kinds = {x.sharding.memory_kind for x in jax.tree_util.tree_leaves(state.policy.opt_state)
             if hasattr(x, "sharding") and x.ndim}
    batch = rl_step.make_rl_batch(programs, state, ref, traj, rewards)
    state, metrics = rl_step.update_epochs(programs, state, batch, np.random.default_rng(1),
                                           jax.random.key(3))
    after = {x.sharding.memory_kind for x in jax.tree_util.tree_leaves(state.policy.opt_state)
             if x.ndim}
    return ref, kinds, after, batch, state, jax.device_get(metrics)

  ref, kinds, after, batch, state, metrics = step()
  assert kinds == after == {"device"}
  assert {x.dtype for x in jax.tree_util.tree_leaves(ref)} == {jnp.dtype("float32")}
  ref2, kinds2, after2, batch2, state2, metrics2 = step(offload_reference=True,
                                                        offload_optimizer=True)
  assert kinds2 == after2 == {rl_settings.HOST_MEMORY}  # between the phases
  assert {x.sharding.memory_kind for x in jax.tree_util.tree_leaves(ref2)} == {
      rl_settings.HOST_MEMORY}
  np.testing.assert_array_equal(batch2.ref_logp, batch.ref_logp)
  jax.tree_util.tree_map(np.testing.assert_array_equal, state2.policy.params,
                         state.policy.params)
  assert metrics2 == metrics
  ref3, _, _, batch3, _, _ = step(reference_dtype="bfloat16")
  assert {x.dtype for x in jax.tree_util.tree_leaves(ref3)} == {jnp.dtype("bfloat16")}
  real = np.asarray(batch.loss_mask) > 0
  gap = np.abs(np.asarray(batch3.ref_logp) - np.asarray(batch.ref_logp))[real]
  assert 0 < gap.max() < 0.05  # rounded, not another model
  np.testing.assert_array_equal(batch3.old_logp, batch.old_logp)  # the policy is untouched


def test_offload_on_a_backend_without_host_memory_is_named():
  from zsjax import rl_settings

  class Memory:
    kind = "device"

  class Device:
    platform = "weird"
    process_index = 0

    def addressable_memories(self):
      return [Memory()]

  r = rl_settings.RLSettings.from_config(__import__("config_files").load_config(
      "zerosearch", "tiny").rl)
  r.check_memory([Device()])  # nothing offloaded: nothing asked of the backend
  offloaded = rl_settings.dataclasses.replace(r, offload_optimizer=True)
  with pytest.raises(ValueError, match=r"config.rl.offload_optimizer=True keep arrays in host "
                                       r"memory, but this backend \(weird\) has no 'pinned_host'"):
    offloaded.check_memory([Device()])
