"""experiments/plan_rl.py on the tiny config: the states and caches it counts
equal an independent count, and the compiled temporaries are present."""

import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import plan_rl  # noqa: E402
from config_files import load_config  # noqa: E402


def test_plan_of_the_tiny_config_counts_states_and_caches():
  from zsjax.model import ModelConfig, init_params

  devices = jax.devices()[:8]
  plan = plan_rl.plan_one("tiny", "tiny", devices)
  config = load_config("zerosearch", "tiny")
  cfg = ModelConfig.from_dict(plan_rl.shape("tiny"))
  leaves = jax.tree_util.tree_leaves(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
  n = sum(x.size for x in leaves)
  gb = plan["per_device_gb"]
  assert plan["params"] == n and plan["rollout_rows"] == 8
  assert gb["policy_params"] * 1e9 == pytest.approx(4 * n / 8)
  assert gb["optimizer"] == pytest.approx(2 * gb["policy_params"])
  assert gb["simulator"] == pytest.approx(gb["policy_params"] / 2)  # bfloat16
  cache = 2 * cfg.num_layers * 8 * config.rollout.max_length * cfg.num_kv_heads * cfg.head_dim * 2
  assert gb["policy_cache"] * 1e9 == pytest.approx(cache / 8)
  assert gb["score_temp"] > 0 and gb["update_temp"] > 0
  assert plan["peak_gb"] == pytest.approx(max(plan["phases_gb"].values()))
  assert all(plan["fits"].values())  # a tiny model fits everywhere
  assert "| tiny | tiny | 8 |" in plan_rl.table([plan])


def test_the_memory_options_move_the_reference_and_optimizer_out_of_the_phases():
  devices = jax.devices()[:8]
  base = plan_rl.plan_one("tiny", "tiny", devices, options="f32_reference")
  plans = {name: plan_rl.plan_one("tiny", "tiny", devices, options=name, temps=base["temps"])
           for name in ("bf16_reference", "bf16_reference+offload")}
  gb = {name: p["per_device_gb"] for name, p in plans.items()}
  assert gb["bf16_reference"]["reference"] == pytest.approx(base["per_device_gb"]["reference"] / 2)
  ref, opt = gb["bf16_reference"]["reference"], gb["bf16_reference"]["optimizer"]
  half, off = plans["bf16_reference"]["phases_gb"], plans["bf16_reference+offload"]["phases_gb"]
  assert off["rollout"] == pytest.approx(half["rollout"] - ref - opt)  # both on the host
  assert off["scoring"] == pytest.approx(half["scoring"] - opt)  # the reference is needed
  assert off["update"] == pytest.approx(half["update"] - ref)  # the optimizer is needed
  assert plans["bf16_reference+offload"]["host_gb"] == pytest.approx(ref + opt)
  assert plans["bf16_reference+offload"]["offload"] == "reference+optimizer"
  assert "| bfloat16 | reference+optimizer (" in plan_rl.table([plans["bf16_reference+offload"]])
