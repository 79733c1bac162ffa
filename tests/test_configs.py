"""Every config builds, and the main job runs end to end from the command line."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zsjax.main import JOBS
from zsjax.model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def load_config(path, arg=None):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_and_names_a_known_job(path):
  config = load_config(path)
  assert config.job in JOBS
  if "policy" in config:
    models = [config.policy.model, config.simulator.model]
  elif config.job == "tiny_world":  # each training stage's job config holds its model
    models = [config.pretrain.model.model, config.warm_start.model.model]
  elif "checkpoint" in config.model:  # a model section: checkpoint or random model fields
    models = [config.model.model]
  else:
    models = [config.model]
  models = [m for m in models if m.to_dict()]  # empty = loaded from a checkpoint
  assert models, "a config must describe at least one random model for offline runs"
  for model in models:
    fields = {**model.to_dict(), "vocab_size": model.get("vocab_size") or 100}
    assert ModelConfig.from_dict(fields).num_layers > 0
  doc = (path.read_text().split('"""')[1])
  assert "python -m zsjax.main" in doc and "Expected" in doc


def test_the_tiny_worlds_default_is_v7_which_is_v6_but_for_its_rl_stages():
  default = load_config(ROOT / "configs/tiny_world.py").to_dict()
  assert default == load_config(ROOT / "configs/tiny_world.py", "v7").to_dict()
  v2 = load_config(ROOT / "configs/tiny_world.py", "v2")
  assert default["world"]["version"] == 5 and v2.world.version == 1
  v6 = _flatten(load_config(ROOT / "configs/tiny_world.py", "v6").to_dict())
  new = _flatten(default)
  assert set(new) == set(v6)
  assert {k.split(".")[0] for k in new if new[k] != v6[k]} == {"rl"}  # v6's stages cache
  assert new["rl.rl.total_steps"] == 25 and new["rl.rl.old_logp_pass"] is False


def test_the_tiny_worlds_v3_arg_changes_only_the_warm_start_it_names():
  def flat(config, prefix=""):
    out = {}
    for key, value in config.items():
      if hasattr(value, "items"):
        out.update(flat(value, f"{prefix}{key}."))
      else:
        out[f"{prefix}{key}"] = value
    return out

  v3 = flat(load_config(ROOT / "configs/tiny_world.py", "v3"))
  v2 = flat(load_config(ROOT / "configs/tiny_world.py", "v2"))
  changed = {k for k in v2 if v2[k] != v3[k]}
  assert set(v3) == set(v2) and changed
  assert changed == {"instruction"} | {k for k in changed if k.startswith("warm_start.")}
  assert v3["warm_start.sft.stop_nll"] > 0 and v3["warm_start.sft.cooldown_steps"] > 0
  assert v3["warm_start.sft.eval_every"] < v3["warm_start.sft.total_steps"]


def test_the_tiny_worlds_v4_arg_is_v3_in_a_version_2_world_checked_by_relation():
  from zsjax import tinyworld

  v3 = load_config(ROOT / "configs/tiny_world.py", "v3").to_dict()
  v4 = load_config(ROOT / "configs/tiny_world.py", "v4")
  assert v4.world.version == 2 and v4.world.version in tinyworld.WORLD_VERSIONS
  assert v4.demo_balance_relations and v4.warm_start.sft.stop_group == "relation"
  assert v4.warm_start.sft.stop_passes >= 2
  v4 = v4.to_dict()
  for key in ("world", "warm_start"):
    v4[key].pop("version", None), v3[key].pop("version", None)
    v4[key]["sft"] = {k: v for k, v in v4[key].get("sft", {}).items()
                      if k not in ("stop_group", "stop_passes")} if key == "warm_start" else None
    v3[key]["sft"] = {k: v for k, v in v3[key].get("sft", {}).items()
                      if k not in ("stop_group", "stop_passes")} if key == "warm_start" else None
  v4.pop("demo_balance_relations"), v3.pop("demo_balance_relations")
  assert v4 == v3  # nothing else differs


@pytest.mark.parametrize("arg", ["tiny", "qwen2.5-7b", "sft"])
def test_sim_tuning_config_args_build(arg):
  config = load_config(ROOT / "configs/sim_tuning.py", arg)
  assert config.job == ("sft" if arg == "sft" else "sim_tuning") and config.job in JOBS
  if arg == "qwen2.5-7b":  # METHOD.md §7: lr 1e-6, batch 2, 1000 steps, LLM judge
    assert (config.sft.learning_rate, config.sft.batch_size, config.sft.total_steps) == (
        1e-6, 2, 1000)
    assert config.sim_tuning.judge == "llm" and config.sim_tuning.balance


@pytest.mark.parametrize("arg", [f"{m},{a}" for m in ("qwen2.5-3b", "qwen2.5-7b", "llama3.2-3b",
                                                      "qwen3-4b")
                                 for a in ("reinforce", "grpo", "ppo")])
def test_paper_rl_configs_carry_the_paper_settings(arg):
  from zsjax import hf, rl_settings

  config = load_config(ROOT / "configs/zerosearch.py", arg)
  if config.engine.kind == "http":  # the served simulator's address is the user's to give
    with pytest.raises(ValueError, match="config.engine.url is empty"):
      rl_settings.check_config(config)
    config.engine.url = "http://127.0.0.1:8000"
  rl_settings.check_config(config)
  r = config.rl
  assert (r.prompts_per_step, r.samples_per_prompt, r.total_steps) == (64, 5, 203)
  assert (r.learning_rate, r.kl_coef, r.kl_type, r.entropy_coef, r.clip_eps) == (
      1e-6, 0.001, "k3", 0.001, 0.2)
  assert r.minibatch_size == 256 and r.epochs == 1 and config.engine.top_k == 5
  assert r.warmup_fraction == (0.285 if r.algorithm == "ppo" else 0.95)
  start, end = {"qwen2.5-3b": (0.0, 0.25), "qwen2.5-7b": (0.0, 0.75),
                "llama3.2-3b": (0.25, 0.5), "qwen3-4b": (0.0, 0.5)}[arg.split(",")[0]]
  assert (config.curriculum.start, config.curriculum.end) == (start, end)
  if r.algorithm == "ppo":
    assert (r.critic_learning_rate, r.value_clip, r.gamma, r.lam) == (1e-5, 0.5, 1.0, 1.0)
    assert r.critic_warmup_fraction == 0.015
  # sampling in training: temperature 1, top-p 0.95; the simulator: 0.8, <= 600 new tokens
  assert (config.sampling.kind, config.sampling.temperature, config.sampling.top_p) == (
      "sample", 1.0, 0.95)
  assert (config.simulator.temperature, config.simulator.max_new_tokens) == (0.8, 600)
  assert r.weight_decay == 0.01 and r.reward == "f1" and r.loss_mask == "policy"
  with pytest.raises(ValueError, match="config.policy.checkpoint"):  # paths are the user's
    hf.load_model(config.policy, None, None, 100, (), what="policy")


def test_model_check_llama_arg_builds_a_scaled_llama():
  cfg = ModelConfig.from_dict(load_config(ROOT / "configs/model_check.py", "llama").model.to_dict())
  assert cfg.arch == "llama" and cfg.rope_scaling.kind == "llama3"


def run_main(tmp_path, *args, devices=1):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.run([sys.executable, "-m", "zsjax.main", f"--workdir={tmp_path}", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# Slow (-m slow): test_model_check_runs_sharded_on_eight_devices runs the same job and
# checks the same report and export on a mesh, and tests/test_sweep.py runs it on one device.
@pytest.mark.slow
def test_model_check_job_runs_and_reports(tmp_path):
  result = run_main(tmp_path, "--config=configs/model_check.py",
                    "--config.model_check.new_tokens=6", "--config.model.num_layers=2")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "model_check.json").read_text())
  assert report["ok"] is True and report["layers"] == 2
  assert report["decode_vs_full_max_abs_logit_diff"] < 1e-4
  assert (tmp_path / "hf_export" / "config.json").exists()
  assert "decode_vs_full_max_abs_logit_diff" in result.stdout


def test_main_rejects_typos_and_unknown_jobs(tmp_path):
  typo = run_main(tmp_path, "--config=configs/model_check.py", "--config.model.num_layerz=2")
  assert typo.returncode != 0 and "num_layerz" in typo.stderr
  job = run_main(tmp_path, "--config=configs/tiny_world.py", "--config.job=nope")
  assert job.returncode != 0 and "config.job='nope'" in job.stderr


def test_model_check_runs_sharded_on_eight_devices(tmp_path):
  result = run_main(tmp_path, "--config=configs/model_check.py", "--config.sharding=fsdp_tp",
                    "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2",
                    "--config.model_check.new_tokens=4", "--config.model.num_layers=2", devices=8)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "model_check.json").read_text())
  assert report["ok"] is True and report["sharding"] == "fsdp_tp" and report["layers"] == 2
  assert report["mesh"] == str({"data": 1, "fsdp": 4, "tensor": 2})
  assert report["decode_vs_full_max_abs_logit_diff"] < 1e-4
  assert (tmp_path / "hf_export" / "config.json").exists()
  assert "decode_vs_full_max_abs_logit_diff" in result.stdout


def test_main_names_a_mesh_that_does_not_fit(tmp_path):
  result = run_main(tmp_path, "--config=configs/model_check.py", "--config.mesh.data=3", devices=8)
  assert result.returncode != 0
  assert "has 3 devices but 8 are available" in result.stderr


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


@pytest.mark.parametrize("arg", ["v5", "v6"])
def test_the_tiny_worlds_v5_arg_is_v4_quoting_its_evidence_and_its_turns_fit(tmp_path, arg):
  from transformers import AutoTokenizer

  from zsjax import demonstrations, tinyworld
  from zsjax.search import BM25Engine

  config = load_config(ROOT / "configs/tiny_world.py", arg)
  new = _flatten(config.to_dict())
  v4 = _flatten(load_config(ROOT / "configs/tiny_world.py", "v4").to_dict())
  v5 = _flatten(load_config(ROOT / "configs/tiny_world.py", "v5").to_dict())
  assert set(new) == set(v4)
  assert {k for k in v5 if v5[k] != v4[k]} == {"world.version", "demo_think",
                                                 "rl.rollout.max_new_tokens"}
  assert {k for k in new if new[k] != v5[k]} == ({"world.version"} if arg == "v6" else set())
  assert config.world.version == {"v5": 3, "v6": 5}[arg] and config.demo_think == "cite"
  # every turn a v5 demonstration writes after its documents (the quote, then a
  # search or the answer) fits a rollout turn, with its end token
  size = tinyworld.WorldSize.from_config(config.world)
  tokenizer = AutoTokenizer.from_pretrained(tinyworld.ensure(tmp_path, 0, size)["tokenizer"])
  world = tinyworld.generate(0, size)
  engine = BM25Engine([d["contents"] for d in world["corpus"]], top_k=config.top_k)
  turns = []
  for row in demonstrations.demonstrations(world, engine, config.instruction, 0,
                                           bridge_fraction=1.0, baseline_fraction=0.0,
                                           think=config.demo_think):
    segments = row["target_segments"]
    for i, segment in enumerate(segments):
      if segment.startswith("<think> "):
        end = i + 4 if segments[i + 2] == "<answer>" else i + 3
        turns.append("".join(segments[i:end]))
  longest = max(len(tokenizer(turn)["input_ids"]) for turn in turns)
  assert len(turns) > 100 and longest + 1 <= config.rl.rollout.max_new_tokens < longest + 16
