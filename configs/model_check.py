"""Check that a model loads, decodes with its KV cache exactly like a full forward,
and exports to an HF directory that reads back unchanged.

Command:
  python -m zsjax.main --config=configs/model_check.py:qwen2 --workdir=/tmp/zsjax_check
  python -m zsjax.main --config=configs/model_check.py \
      --config.model_check.checkpoint=/models/Qwen2.5-3B-Instruct --workdir=/tmp/check_3b
Arg: "qwen2" (default) or "llama": the family of the random model built when no
  checkpoint is given.
Hardware: any; the random model runs in ~30 s on a 2-core CPU.
Expected: prints a table with decode_vs_full_max_abs_logit_diff below 1e-4
  (float32), export_max_abs_diff 0, ok True; writes WORKDIR/model_check.json and
  WORKDIR/hf_export/. Exit status 1 when a check fails.
"""

import ml_collections


def model_config(family: str) -> ml_collections.ConfigDict:
  """A small random model of either family (fields of zsjax.model.ModelConfig)."""
  if family not in ("qwen2", "llama"):
    raise ValueError(f"config arg {family!r}: use 'qwen2' or 'llama'.")
  model = dict(arch=family, vocab_size=512, embed_dim=128, mlp_dim=352, num_layers=4,
               num_heads=8, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
               max_position_embeddings=2048, tie_embeddings=family == "qwen2",
               qkv_bias=family == "qwen2", eos_token_ids=(1,), dtype="float32",
               param_dtype="float32", remat="none")
  if family == "llama":
    model.update(rope_theta=500000.0, rope_scaling=dict(
        kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))
  return ml_collections.ConfigDict(model)


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.job = "model_check"
  config.seed = 0
  config.model = model_config(arg or "qwen2")
  # Sharding: mesh sizes (-1 = the devices left over) and a preset of zsjax.sharding.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding = "dp"  # dp | fsdp | tp | fsdp_tp
  config.sharding_rules = ()  # (logical_name, mesh_axes) pairs overriding the preset
  # multi-process start-up (zsjax.sharding.initialize_distributed); empty / 0 / -1 = the
  # environment's JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; auto: let JAX
  # find the cluster (SLURM, TPU pods); local_device_ids: this process's devices, () = all
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=0, process_id=-1, auto=False, local_device_ids=()))
  config.model_check = ml_collections.ConfigDict(dict(
      checkpoint="",  # a local HF directory; empty = random model from config.model
      batch_size=4,
      prompt_length=24,
      new_tokens=32,
      tolerance=1e-4,
  ))
  return config


def sweep(add):
  """Two seeds of a 2-layer model (the sweep tool's test)."""
  for seed in (0, 1):
    add(seed=seed, **{"model.num_layers": 2, "model_check.new_tokens": 4})
