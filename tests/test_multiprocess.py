"""Two processes on localhost (JAX's distributed runtime, 4 CPU devices each)
compute the same update step as one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import two_process_worker as worker
from zsjax import sharding as S

HERE = Path(__file__).resolve().parent


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  out = tmp_path / "result.json"
  port = str(free_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, str(HERE / "two_process_worker.py"), str(i), "2",
                             port, str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=300)[0])
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  two = json.loads(out.read_text())
  assert two["started"] and two["process_count"] == 2 and two["device_count"] == 8
  assert len(two["local_rows"]) == worker.BATCH // 2

  # The same step in this process, on the 8 fake devices of conftest.py.
  plan = S.ShardingPlan(S.make_mesh(worker.MESH), S.rules_for(worker.STRATEGY), worker.STRATEGY)
  assert jax.process_count() == 1 and len(plan.process_rows(worker.BATCH)) == worker.BATCH
  one = worker.one_step(plan, worker.global_batch())
  for key in ("loss", "grad_norm", "param_sq_sum"):
    np.testing.assert_allclose(two[key], one[key], rtol=1e-5, err_msg=key)
