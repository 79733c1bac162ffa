"""Sharding on 8 fake CPU devices (set in conftest.py): every preset computes what
one device computes, lays params out as it says, and bad meshes fail early."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from zsjax import hf
from zsjax import model as M
from zsjax import sharding as S
from zsjax import train_step as T

CFG = M.ModelConfig(vocab_size=128, embed_dim=64, mlp_dim=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, arch="qwen2", qkv_bias=True)
MESHES = {
    "dp": {"data": 8},
    "fsdp": {"fsdp": 8},
    "tp": {"data": 4, "tensor": 2},
    "fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2},
}
# Expected mesh layout of q_proj [Y, D, N, H], up_proj [Y, D, F] and lm_head [D, V].
LAYOUTS = {
    "dp": (P(None, None, None, None), P(None, None, None), P(None, None)),
    "fsdp": (P(None, "fsdp", None, None), P(None, "fsdp", None), P("fsdp", None)),
    "tp": (P(None, None, "tensor", None), P(None, None, "tensor"), P(None, "tensor")),
    "fsdp_tp": (P(None, "fsdp", "tensor", None), P(None, "fsdp", "tensor"), P("fsdp", "tensor")),
}


def make_batch(b=8, l=12, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((b, l), np.int32)
  mask[:, :3] = 0  # a "prompt" that the loss skips
  return {"tokens": rng.integers(0, CFG.vocab_size, (b, l)).astype(np.int32), "loss_mask": mask}


def plan_for(strategy, mesh, devices=None):
  return S.ShardingPlan(S.make_mesh(mesh, devices), S.rules_for(strategy), strategy)


@pytest.fixture(scope="module")
def reference():
  """One device: loss, gradients and one AdamW update."""
  assert jax.device_count() == 8, "conftest.py should give 8 fake CPU devices"
  plan = plan_for("dp", {"data": 1}, jax.devices()[:1])
  return run_step(plan)


def run_step(plan):
  # eps=1e-3 keeps Adam's first step (~ lr * g / (|g| + eps)) smooth in g, so the
  # updated params inherit the gradients' agreement instead of amplifying the
  # rounding of entries with |g| near eps.
  tx, schedule = T.make_optimizer(1e-2, 10, eps=1e-3)
  loss_fn = functools.partial(T.next_token_loss, CFG)
  batch = make_batch()
  state, shardings = T.create_train_state(CFG, tx, plan, rng=jax.random.key(0))
  batch_shardings = plan.batch(batch)
  grad_fn = T.make_grad_fn(loss_fn, plan, shardings.params, batch_shardings)
  (loss, _), grads = grad_fn(state.params, plan.put_batch(batch), jax.random.key(1))
  update = T.make_update_step(loss_fn, tx, plan, shardings, batch_shardings, schedule)
  new_state, metrics = update(state, plan.put_batch(batch), jax.random.key(1))
  return {"loss": float(loss), "grads": jax.device_get(grads), "state": new_state,
          "params": jax.device_get(new_state.params), "metrics": jax.device_get(metrics)}


# The default run checks dp and fsdp_tp (every mesh axis at once); fsdp and tp alone
# are slow (-m slow). tests/test_bench_sharding.py runs a step in all four layouts
# and checks their losses agree.
@pytest.mark.parametrize("strategy", [
    pytest.param(s, marks=[pytest.mark.slow] if s in ("fsdp", "tp") else [])
    for s in sorted(MESHES)])
def test_preset_matches_single_device(strategy, reference):
  plan = plan_for(strategy, MESHES[strategy])
  out = run_step(plan)
  np.testing.assert_allclose(out["loss"], reference["loss"], rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         out["grads"], reference["grads"])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         out["params"], reference["params"])
  np.testing.assert_allclose(out["metrics"]["optim/grad_norm"],
                             reference["metrics"]["optim/grad_norm"], rtol=1e-5)
  assert int(out["state"].step) == 1

  params = out["state"].params
  got = (params["layers"]["attn"]["q_proj"]["kernel"].sharding.spec,
         params["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec,
         params["lm_head"].sharding.spec)
  want = tuple(P(*spec, *(None,) * (n - len(spec))) for spec, n in zip(LAYOUTS[strategy], (4, 3, 2)))
  assert tuple(P(*s, *(None,) * (n - len(s))) for s, n in zip(got, (4, 3, 2))) == want
  mu = out["state"].opt_state[1][0].mu  # AdamW first moment sits like its param
  assert (mu["layers"]["mlp"]["up_proj"]["kernel"].sharding
          == params["layers"]["mlp"]["up_proj"]["kernel"].sharding)


def test_fsdp_splits_param_bytes_across_devices():
  plan = plan_for("fsdp", {"fsdp": 8})
  tx, _ = T.make_optimizer(1e-3, 10)
  state, _ = T.create_train_state(CFG, tx, plan, rng=jax.random.key(0))
  held = S.bytes_per_device(state.params)
  total = sum(x.nbytes for x in jax.tree_util.tree_leaves(state.params))
  assert len(held) == 8
  for per_device in held.values():  # norms and biases are replicated, so a little above 1/8
    assert total / 8 <= per_device < 1.1 * total / 8
  dp_state, _ = T.create_train_state(CFG, tx, plan_for("dp", {"data": 8}), rng=jax.random.key(0))
  assert all(v == total for v in S.bytes_per_device(dp_state.params).values())


def test_sharded_hf_load_places_each_param_on_its_shards(tmp_path):
  params = M.init_params(CFG, jax.random.key(3))
  hf.save_checkpoint(tmp_path, CFG, params)
  plan = plan_for("fsdp_tp", {"fsdp": 4, "tensor": 2})
  cfg, sharded = hf.load_checkpoint(tmp_path, plan=plan)
  want = plan.params(cfg)
  jax.tree_util.tree_map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(
      f"{x.sharding} != {s}"), sharded, want)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                         sharded, params)
  kernel = sharded["layers"]["mlp"]["gate_proj"]["kernel"]  # [Y, D, F] split 4 x 2
  assert {s.data.shape for s in kernel.addressable_shards} == {(2, 16, 48)}


def test_sharded_log_probs_and_cache_decode_match_one_device():
  params = M.init_params(CFG, jax.random.key(4))
  batch = make_batch(seed=5)
  segment = np.ones_like(batch["tokens"])
  segment[:4, -2:] = 0  # right padding on half the rows
  ref = M.token_log_probs(CFG, params, jnp.asarray(batch["tokens"]), jnp.asarray(segment))
  plan = plan_for("fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2})
  param_shardings = plan.params(CFG)
  log_probs = T.make_log_prob_fn(CFG, plan, param_shardings, 8, 12)
  out = log_probs(jax.device_put(params, param_shardings), batch["tokens"], segment)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  assert out.sharding.spec == P(("data", "fsdp"), None)
  assert float(jnp.abs(out[:4, -2:]).max()) == 0.0 and float(jnp.abs(out[:, 0]).max()) == 0.0

  cache_shardings = plan.cache(CFG, 8, 16)
  assert cache_shardings.k.spec == P(None, ("data", "fsdp"), None, "tensor", None)
  model = M.Transformer(CFG)
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c),
                 in_shardings=(param_shardings, plan.batch(batch["tokens"]), cache_shardings),
                 out_shardings=(plan.batch(jax.ShapeDtypeStruct((8, 12, 128), jnp.float32)),
                                cache_shardings))
  cache = jax.device_put(M.init_cache(CFG, 8, 16), cache_shardings)
  logits, cache = step(jax.device_put(params, param_shardings), batch["tokens"], cache)
  np.testing.assert_allclose(logits, model.apply({"params": params}, jnp.asarray(batch["tokens"])),
                             rtol=1e-5, atol=1e-5)
  assert cache.k.sharding.is_equivalent_to(cache_shardings.k, 5)


@pytest.mark.parametrize("mesh,needle", [
    ({"data": 3}, "has 3 devices but 8 are available"),
    ({"data": 3, "fsdp": -1}, "does not divide the 8 devices"),
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"pipeline": 2}, "'pipeline'"),
])
def test_bad_mesh_fails_with_sizes(mesh, needle):
  with pytest.raises(S.ShardingError, match=needle):
    S.make_mesh(mesh)


def test_undividable_heads_and_batch_fail_before_compiling():
  plan = plan_for("tp", {"tensor": 8})
  with pytest.raises(S.ShardingError, match=r"kv_heads.*size 2.*\('tensor',\).*8"):
    plan.params(CFG)
  plan = plan_for("dp", {"data": 8})
  with pytest.raises(S.ShardingError, match="batch size 6 is not divisible by .* 8"):
    plan.batch({"tokens": np.zeros((6, 4), np.int32)})
  with pytest.raises(S.ShardingError, match="'zero3' is not one of"):
    S.rules_for("zero3")
  with pytest.raises(S.ShardingError, match="mesh axis 'model'"):
    S.rules_for("dp", [("mlp", "model")])


def test_custom_rules_override_a_preset():
  plan = S.ShardingPlan(S.make_mesh({"data": 2, "tensor": 4}),
                        S.rules_for("tp", [("kv_heads", None)]), "tp")
  shardings = plan.params(CFG)  # K=2 cannot split 4 ways, so kv heads stay whole
  assert shardings["layers"]["attn"]["k_proj"]["kernel"].spec == P(None, None, None, None)
  assert shardings["layers"]["attn"]["q_proj"]["kernel"].spec == P(None, None, "tensor", None)


def test_plan_from_config():
  import ml_collections
  config = ml_collections.ConfigDict({"mesh": {"data": -1, "fsdp": 2, "tensor": 2},
                                      "sharding": "fsdp_tp", "sharding_rules": ()})
  plan = S.ShardingPlan.from_config(config)
  assert plan.sizes == {"data": 2, "fsdp": 2, "tensor": 2} and plan.batch_divisor == 4
