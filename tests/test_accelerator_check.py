"""The accelerator check's reduced mode (experiments/accelerator_check.py --cpu):
every part runs and reports, on the CPU, what it will report on a GPU."""

import json
import math
import sys
from pathlib import Path

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
  r = result["rl_step"]
  assert r["trajectories"] == setup["rl"]["prompts"] * setup["rl"]["samples"]
  assert 0 < r["step_s"] < r["first_step_s"]  # the first step compiles
  saved = json.loads((tmp_path / "accelerator_check.json").read_text())
  assert saved["decode"] == result["decode"] and saved["environment"]["cores"] >= 1
  assert "| tiny |" in (tmp_path / "README.md").read_text()
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last["mode"] == "cpu" and last["rl_step_s"] == r["step_s"]
