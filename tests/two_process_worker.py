"""One process of the two-process test (tests/test_multiprocess.py).

usage: python two_process_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON
Each process has 4 fake CPU devices; together they form one 8-device mesh.
"""

import json
import os
import sys

import numpy as np

MESH = {"data": 2, "fsdp": 2, "tensor": 2}
STRATEGY = "fsdp_tp"
BATCH, LENGTH = 8, 12


def global_batch():
  rng = np.random.default_rng(0)
  mask = np.ones((BATCH, LENGTH), np.int32)
  mask[:, :3] = 0
  return {"tokens": rng.integers(0, 128, (BATCH, LENGTH)).astype(np.int32), "loss_mask": mask}


def model_config():
  from zsjax.model import ModelConfig
  return ModelConfig(vocab_size=128, embed_dim=64, mlp_dim=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, arch="qwen2", qkv_bias=True)


def one_step(plan, local_batch):
  """An AdamW update; returns loss, grad norm and a checksum of the new params."""
  import functools

  import jax
  import jax.numpy as jnp

  from zsjax import train_step as T

  cfg = model_config()
  tx, _ = T.make_optimizer(1e-2, 10)
  state, shardings = T.create_train_state(cfg, tx, plan, rng=jax.random.key(0))
  batch = plan.put_batch(local_batch)
  update = T.make_update_step(functools.partial(T.next_token_loss, cfg), tx, plan, shardings,
                              plan.batch(jax.tree_util.tree_map(
                                  lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)))
  state, metrics = update(state, batch, jax.random.key(1))
  checksum = jax.jit(lambda p: sum(jnp.sum(x.astype(jnp.float32) ** 2)
                                   for x in jax.tree_util.tree_leaves(p)),
                     out_shardings=plan.replicated())(state.params)

  def scalar(x):
    return float(np.asarray(x.addressable_data(0)))

  return {"loss": scalar(metrics["loss/total"]), "grad_norm": scalar(metrics["optim/grad_norm"]),
          "param_sq_sum": scalar(checksum)}


def main():
  process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
  from zsjax import sharding as S

  started = S.initialize_distributed({"coordinator_address": f"127.0.0.1:{port}",
                                      "num_processes": num_processes, "process_id": process_id,
                                      "auto": False, "local_device_ids": ()})
  import jax

  plan = S.ShardingPlan(S.make_mesh(MESH), S.rules_for(STRATEGY), STRATEGY)
  rows = plan.process_rows(BATCH)
  local = {k: v[rows] for k, v in global_batch().items()}
  result = one_step(plan, local)
  result.update(started=started, process_count=jax.process_count(),
                device_count=jax.device_count(), local_rows=rows.tolist())
  if S.is_main_process():
    with open(out, "w") as f:
      json.dump(result, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  # Before JAX starts its backend (the test module imports this file too, so not
  # at import time).
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  main()
