"""The RL-regime rollout benchmark runs at a tiny size: every loop generates the
same tokens' worth of work, and it ends with its JSON summary."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import bench_rollout  # noqa: E402

pytest.importorskip("torch")


def test_rollout_benchmark_runs_every_loop_on_the_same_work(tmp_path, capsys):
  rows = bench_rollout.main(["--sizes=tiny", "--batch=4", "--prompt_tokens=8",
                             "--new_tokens=16", "--turns=3", "--doc_tokens=8",
                             "--max_length=160", "--repeats=1", f"--out={tmp_path}",
                             "--samples=2", "--loops=jit,jit_shared,python,reference,model_only"])
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for key in ("jit_tokens_per_s", "python_tokens_per_s", "reference_tokens_per_s",
              "model_only_tokens_per_s", "ratio_vs_reference", "ratio_vs_python",
              "fraction_of_model_only"):
    assert summary[key] > 0, key
  row = rows[0]
  # 4 rows x 3 turns x 16 policy tokens; 2 searches a row x 8 simulator tokens
  assert row["policy_tokens"] == 4 * 3 * 16 and row["simulator_tokens"] == 4 * 2 * 8
  for loop in ("jit", "python", "reference"):
    assert row[f"{loop}_policy_tokens"] == row["policy_tokens"], loop
  assert row["python_simulator_tokens"] == row["reference_simulator_tokens"] == 4 * 2 * 8
  assert row["jit_searches"] == 4 * 2
  assert row["shared_speedup"] == pytest.approx(row["jit_s"] / row["jit_shared_s"])  # and the
  # bench checked that the prompt prefilled once per pair of rows gave the same trajectories
  assert row["ratio_vs_python"] == pytest.approx(row["python_s"] / row["jit_s"])
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["environment"]["cores"] >= 1 and "torch" in saved["environment"]["packages"] and saved["rows"][0]["size"] == "tiny"
  assert "| tiny |" in (tmp_path / "results.md").read_text()


def test_scripted_actions_end_every_turn_with_a_search_and_the_last_with_an_answer():
  tokenizer = bench_rollout.make_tokenizer(600)
  script = bench_rollout.action_script(tokenizer, turns=3, new_tokens=20)
  assert script.shape == (61,) and script[-1] == -1
  turns = [tokenizer.decode([t for t in script[i * 20:(i + 1) * 20] if t >= 0])
           for i in range(3)]
  assert turns[0] == turns[1] == "<search> Orlam founder </search>"
  assert turns[2] == f"<answer> {bench_rollout.ANSWER} </answer>"
  with pytest.raises(ValueError, match="--new_tokens=4"):
    bench_rollout.action_script(tokenizer, turns=2, new_tokens=4)
