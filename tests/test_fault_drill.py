"""The fault drill's short version (experiments/fault_drill.py runs every server
failure against both jobs): a dead server is refused at start with its URL, RL
against a server that starts failing mid-run stops with the engine's error after
max_failed_steps steps, keeping its checkpoints, and evaluation against it keeps
every scored question and exits non-zero."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import fault_drill  # noqa: E402


def test_short_fault_drill(tmp_path):
  rows = fault_drill.run(["dead", "error"], ["rl"], tmp_path) + fault_drill.run(
      ["garbage"], ["eval"], tmp_path)
  assert [r["violations"] for r in rows] == [[], [], []]
  dead, error, garbage = rows
  assert dead["outcome"] == "refused at start" and "Connection refused" in dead["message"]
  assert error["outcome"] == "stopped" and "HTTP 500" in error["message"]
  assert error["failed_share"] == [0.0, 1.0, 1.0] and error["checkpoints"] == [1, 2]
  assert any("RL step 2: 100% of search calls failed" in line for line in error["printed"])
  assert "last checkpoint" in error["message"] or "from checkpoint step 2" in error["message"]
  assert garbage["outcome"] == "finished, exit 1" and garbage["predictions"] == 16
  assert garbage["failed_share"] == [0.0, 1.0]  # the first set was searched before the fault
