"""The sweep tool: a two-point sweep of a tiny config runs, resumes and collects."""

import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_tool():
  spec = importlib.util.spec_from_file_location("sweep", ROOT / "experiments/sweep.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_config_sweep_declares_points():
  sweep = load_tool()
  for name in ("default", "simulator", "curriculum", "loss_mask", "algorithms"):
    points = sweep.load_sweep(str(ROOT / "configs/tiny_world.py"), name)
    assert {p["seed"] for p in points} == {0, 1, 2}
  with pytest.raises(SystemExit, match="sweep_nope"):
    sweep.load_sweep(str(ROOT / "configs/tiny_world.py"), "nope")


def test_two_point_sweep_runs_resumes_and_collects(tmp_path, monkeypatch, capsys):
  sweep = load_tool()
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  args = ["--config=configs/model_check.py", f"--root={tmp_path}",
          "--metrics=decode_vs_full_max_abs_logit_diff,params,layers"]
  assert sweep.main(args) == 0
  rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
  assert [r["seed"] for r in rows] == ["0", "1"]
  points = [json.loads((tmp_path / p / "sweep_point.json").read_text())
            for p in sorted(os.listdir(tmp_path)) if (tmp_path / p / "sweep_point.json").exists()]
  assert len(points) == 2 and all(p["metrics"]["layers"] == 2.0 for p in points)
  diffs = [p["metrics"]["decode_vs_full_max_abs_logit_diff"] for p in points]
  table = (tmp_path / "sweep.md").read_text()
  assert "| model.num_layers=2,model_check.new_tokens=4 | 2 |" in table
  mean = sum(diffs) / 2
  assert f"{mean:.4g} ±" in table  # the group's mean over the two seeds
  assert (tmp_path / "plots" / "params.png").exists()
  capsys.readouterr()
  assert sweep.main(args) == 0  # resumes: both points finished before
  assert capsys.readouterr().out.count("finished before") == 2
  sweep.main(args + ["--print"])
  printed = capsys.readouterr().out.strip().splitlines()
  assert len(printed) == 2 and all("--config.seed=" in line for line in printed)
  # --set adds a flag to every point without renaming it (so the points are found)
  sweep.main(args + ["--print", "--set=model_check.prompt_length=9"])
  printed = capsys.readouterr().out.strip().splitlines()
  assert all("--config.model_check.prompt_length=9" in line for line in printed)
  assert all(f"--workdir={tmp_path}/model.num_layers=2+model_check.new_tokens=4+seed=" in line
             for line in printed)
  with pytest.raises(SystemExit, match="KEY=VALUE"):
    sweep.main(args + ["--set=oops"])


def test_named_sweeps_share_a_root_and_hide_keys(tmp_path):
  sweep = load_tool()
  records = [{"overrides": {"seed": s, **arm}, "wall_seconds": 1.0,
              "metrics": {"em": em}}
             for s, arm, em in ((0, {}, 0.2), (1, {}, 0.4),
                                (0, {"flag": False, "lr": 1}, 0.5),
                                (1, {"flag": False, "lr": 1}, 0.7))]
  table = sweep.collect(tmp_path, records, ["em"], "lr", hide=("flag",))
  assert "| default | 2 | 0.3 ± 0.14 |" in table and "| lr=1 | 2 | 0.6 ± 0.14 |" in table
  assert (tmp_path / "sweep_lr.md").read_text() == table
  assert (tmp_path / "sweep_lr.csv").exists() and (tmp_path / "plots" / "lr" / "em.png").exists()
  assert not (tmp_path / "sweep.md").exists()
