"""The rollout benchmark runs at a tiny size and ends with its JSON summary."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import bench_rollout  # noqa: E402

pytest.importorskip("torch")


def test_rollout_benchmark_summary(tmp_path, capsys):
  rows = bench_rollout.main(["--sizes=tiny", "--batch=2", "--prompt_tokens=8", "--new_tokens=4",
                             "--turns=2", "--repeats=1", f"--out={tmp_path}"])
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for key in ("jit_tokens_per_s", "python_tokens_per_s", "hf_tokens_per_s", "ratio_vs_python",
              "ratio_vs_hf", "flops_fraction_of_peak", "model_only_tokens_per_s",
              "model_only_vs_hf"):
    assert summary[key] > 0, key
  assert rows[0]["jit_equals_python"] and rows[0]["hf_same_length"]
  assert rows[0]["generated_tokens"] == 2 * 4 * 2
  assert rows[0]["model_only_vs_hf"] == pytest.approx(
      rows[0]["model_only_tokens_per_s"] / rows[0]["hf_tokens_per_s"])
  assert "| tiny |" in (tmp_path / "results.md").read_text()
