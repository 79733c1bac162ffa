"""Metrics files read back with TensorBoard's own reader; Orbax checkpoints:
keep-last-k, sharded restore, and resume == an uninterrupted run."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zsjax import checkpoint as C
from zsjax import metrics as MT
from zsjax import model as M
from zsjax import sharding as S
from zsjax import train_step as T


def read_tensorboard(logdir):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  acc = EventAccumulator(str(logdir))
  acc.Reload()
  return {tag: [(e.step, float(e.tensor_proto.float_val[0])) for e in acc.Tensors(tag)]
          for tag in acc.Tags()["tensors"]}


def test_metrics_written_to_tensorboard_and_jsonl(tmp_path):
  with MT.MetricWriter(tmp_path) as writer:
    writer.write(1, {"reward/f1": 0.25, "loss/kl": jnp.float32(0.5)})
    assert writer.write_later(2, {"reward/f1": jnp.float32(0.75)}) is None  # held one step
    assert writer.write_later(3, {"reward/f1": 1.0}) == {"reward/f1": 0.75}
  events = read_tensorboard(tmp_path / "tensorboard")
  assert events["reward/f1"] == [(1, 0.25), (2, 0.75), (3, 1.0)]
  assert events["loss/kl"] == [(1, 0.5)]
  records = MT.read_jsonl(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["reward/f1"]) for r in records] == [(1, 0.25), (2, 0.75), (3, 1.0)]


def test_a_resumed_writer_drops_records_past_its_checkpoint(tmp_path):
  with MT.MetricWriter(tmp_path) as writer:
    for step in range(1, 6):
      writer.write(step, {"reward/f1": step / 10})
  samples = tmp_path / "samples.jsonl"
  samples.write_text("".join(f'{{"step": {s}, "row": {r}}}\n' for s in (2, 4, 5) for r in (0, 1)))
  MT.drop_steps_after(samples, 4)
  assert [(r["step"], r["row"]) for r in MT.read_jsonl(samples)] == [(2, 0), (2, 1), (4, 0), (4, 1)]
  MT.drop_steps_after(tmp_path / "absent.jsonl", 1)  # nothing to drop: no file is made
  assert not (tmp_path / "absent.jsonl").exists()
  with MT.MetricWriter(tmp_path, resume_from=3) as writer:
    writer.write(4, {"reward/f1": 0.9})
  records = MT.read_jsonl(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["reward/f1"]) for r in records] == [
      (1, 0.1), (2, 0.2), (3, pytest.approx(0.3)), (4, pytest.approx(0.9))]


def test_metric_errors_name_the_metric_and_step(tmp_path):
  writer = MT.MetricWriter(tmp_path)
  with pytest.raises(ValueError, match="'loss' is not slash-named"):
    writer.write(1, {"loss": 1.0})
  with pytest.raises(FloatingPointError, match=r"step 7.*loss/total"):
    writer.write(7, {"loss/total": math.nan})
  with pytest.raises(ValueError, match="must be scalars"):
    writer.write(1, {"x/y": np.zeros(3)})
  writer.close()
  silent = MT.MetricWriter(tmp_path / "other", enabled=False)
  silent.write(1, {"a/b": 1.0})
  silent.close()
  assert not (tmp_path / "other").exists()


CFG = M.ModelConfig(vocab_size=64, embed_dim=32, mlp_dim=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8)


def setup_training():
  plan = S.ShardingPlan(S.make_mesh({"fsdp": 8}), S.rules_for("fsdp"), "fsdp")
  tx, _ = T.make_optimizer(1e-2, 20)
  state, shardings = T.create_train_state(CFG, tx, plan, rng=jax.random.key(0))
  rng = np.random.default_rng(0)
  batches = [{"tokens": rng.integers(0, 64, (8, 12)).astype(np.int32),
              "loss_mask": np.ones((8, 12), np.int32)} for _ in range(4)]
  update = T.make_update_step(functools.partial(T.next_token_loss, CFG), tx, plan, shardings,
                              plan.batch(batches[0]))
  return plan, state, shardings, batches, update


def test_keep_last_k_and_sharded_restore(tmp_path):
  plan, state, shardings, _, _ = setup_training()
  ckpt = C.Checkpointer(tmp_path, max_to_keep=2)
  assert ckpt.latest() == "none yet (a rerun starts from step 0)"  # never "step None"
  for step in (1, 2, 3):
    ckpt.save(step, state, {"data_position": step * 8})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3 and ckpt.latest() == "step 3"
  restored, extra = ckpt.restore(C.abstract_like(state, shardings))
  assert extra == {"data_position": 24}
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                         restored, state)
  kernel = restored.params["layers"]["mlp"]["up_proj"]["kernel"]
  assert kernel.sharding.is_equivalent_to(shardings.params["layers"]["mlp"]["up_proj"]["kernel"], 3)
  ckpt.close()
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    C.Checkpointer(tmp_path / "empty").restore(C.abstract_like(state))


def test_resume_equals_an_uninterrupted_run(tmp_path):
  plan, state, shardings, batches, update = setup_training()
  key = jax.random.key(1)
  straight = state
  for batch in batches:
    straight, _ = update(straight, plan.put_batch(batch), key)

  plan, state, shardings, batches, update = setup_training()
  ckpt = C.Checkpointer(tmp_path, max_to_keep=1)
  for i, batch in enumerate(batches[:2]):
    state, _ = update(state, plan.put_batch(batch), key)
  ckpt.save(2, state, {"data_position": 2})
  ckpt.close()
  del state  # a new process would start here

  fresh = C.Checkpointer(tmp_path)
  target = C.abstract_like(jax.eval_shape(lambda: T.init_state(
      CFG, T.make_optimizer(1e-2, 20)[0], jax.random.key(0))), shardings)
  resumed, extra, was_resumed = fresh.restore_or(target, fallback=lambda: None)
  assert was_resumed and int(resumed.step) == 2
  for batch in batches[extra["data_position"]:]:
    resumed, _ = update(resumed, plan.put_batch(batch), key)
  fresh.close()
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                         resumed, straight)
