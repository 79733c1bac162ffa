"""The sharding benchmark runs on the 8 fake devices, writes its files and ends
with the JSON summary; plan mode compiles without running."""

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import bench_sharding  # noqa: E402

FAST = ["--model=tiny", "--batch=8", "--length=16", "--steps=2", "--warmup=1", "--peak_size=256"]


def test_benchmark_table_files_and_summary_line(tmp_path, capsys):
  rows = bench_sharding.main(FAST + [f"--out={tmp_path}"])
  printed = capsys.readouterr().out.strip().splitlines()
  summary = json.loads(printed[-1])
  assert set(summary) == {"dp", "fsdp", "tp", "fsdp_tp"}
  losses = {r["strategy"]: r["loss"] for r in rows}
  assert max(losses.values()) - min(losses.values()) < 1e-4  # one model, four layouts
  for strategy, entry in summary.items():
    assert entry["step_s"] > 0 and entry["tokens_per_s"] > 0 and entry["bytes_per_device"] > 0
    assert 0 < entry["mfu"] < 1.5, entry
  by = {r["strategy"]: r for r in rows}
  # FSDP holds ~1/8 of the params per device; dp holds all of them.
  assert by["fsdp"]["param_bytes_per_device"] < by["dp"]["param_bytes_per_device"] / 6
  with open(tmp_path / "results.csv") as f:
    assert len(list(csv.DictReader(f))) == 4
  assert "| fsdp_tp |" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "results.png").stat().st_size > 1000


def test_plan_mode_compiles_only_and_reports_undividable_meshes(capsys):
  rows = bench_sharding.main(["--plan", "--model=tiny", "--batch=8", "--length=16",
                              "--strategies=fsdp,tp", "--tensor=8"])
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  fsdp = next(r for r in rows if r["strategy"] == "fsdp")
  assert "step_s" not in fsdp and fsdp["bytes_per_device"] > 0 and fsdp["compile_s"] > 0
  assert summary["fsdp"]["step_s"] is None
  assert "kv_heads" in summary["tp"]["skipped"] and "size 2" in summary["tp"]["skipped"]


def test_unknown_model_exits_with_the_choices():
  with pytest.raises(SystemExit, match="qwen2.5-7b"):
    bench_sharding.main(["--plan", "--model=gpt5"])
