"""The accelerator check's reduced mode (experiments/accelerator_check.py --cpu):
every part runs and reports, on the CPU, what it will report on a GPU."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import accelerator_check  # noqa: E402


def test_reduced_accelerator_check_measures_every_part(tmp_path, capsys):
  result = accelerator_check.main(["--cpu", f"--out={tmp_path}"])
  setup = accelerator_check.CPU
  assert result["copy_gb_s"] > 0 and result["matmul_tflop_s"] > 0
  assert [(d["shape"], d["batch"]) for d in result["decode"]] == [
      ("tiny", b) for b in setup["batches"]]
  for d in result["decode"]:
    # no end tokens: every row decodes every step of the turn
    assert d["tokens"] == d["batch"] * setup["new"]
    assert math.isfinite(d["tokens_per_s"]) and d["tokens_per_s"] > 0
    assert 0 < d["bandwidth_fraction"] and d["ceiling_step_ms"] > 0
  assert 0 < result["train"]["mfu"] < 1 and result["train"]["step_s"] > 0
  r = result["paper_step"]
  rows = int(accelerator_check.CPU_PLAN[3]["rl.prompts_per_step"]) * int(
      accelerator_check.CPU_PLAN[3]["rl.samples_per_prompt"])
  paper = setup["paper"]
  assert r["plan"] == "cpu" and r["trajectories"] == rows and r["waves"] == 2
  # the scripted actions: every row searches, then answers, in turns of turn_tokens
  assert r["searches_per_row"] == paper["searches"] and r["truncated"] == 0.0
  assert r["policy_tokens_per_row"] == (paper["searches"] + 1) * paper["turn_tokens"]
  for key in ("simulator_decode_s", "rollout_s", "scoring_s", "update_s", "compile_s"):
    assert math.isfinite(r[key]) and r[key] > 0, key
  # the policy's share is the rollout less the simulator's, timed apart (never negative)
  assert r["policy_decode_s"] == pytest.approx(max(r["rollout_s"] - r["simulator_decode_s"], 0))
  assert r["step_s"] == pytest.approx(r["rollout_s"] + r["scoring_s"] + r["update_s"]
                                      + r["reward_s"])
  # compiling is counted apart: the first step's wall time holds the step and its compiles
  assert r["step_s"] + r["compile_s"] <= r["first_step_wall_s"] + 1e-6
  saved = json.loads((tmp_path / "accelerator_check.json").read_text())
  assert saved["decode"] == result["decode"] and saved["environment"]["cores"] >= 1
  assert saved["paper_step"] == r
  text = (tmp_path / "README.md").read_text()
  assert "| tiny |" in text and "One paper-shaped RL step" in text
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last["mode"] == "cpu" and last["paper_step_s"] == r["step_s"]


def test_the_committed_plans_are_read_and_the_first_that_fits_is_taken():
  plans = accelerator_check._load_plans()
  assert [p[0] for p in plans] == list(accelerator_check.PAPER_PLANS)
  by_name = {p[0]: p for p in plans}
  h200 = by_name["one_h200_3b"]
  assert h200[1] == "qwen2.5-14b" and 100 < h200[2] <= 0.9 * 141
  assert accelerator_check.pick_plan(141.0, cpu=False)[0] == "one_h200_3b"
  for small in (80.0, 16.0):  # no committed plan holds the 3B step on an H100 or a TPU v5e
    with pytest.raises(ValueError, match=f"no committed plan fits {small:.0f} GB"):
      accelerator_check.pick_plan(small, cpu=False)
