"""zsjax entry point.

  python -m zsjax.main --config=configs/<name>.py[:arg] --workdir=DIR [--config.field=value ...]

The config's ``job`` field picks what runs; each job is ``run(config, workdir)``
in its own module, imported only when chosen.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags
from ml_collections import config_flags

from zsjax import sharding

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/<name>.py file, optionally ':arg'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, logs, results).")

# job name -> "module:function"
JOBS = {
    "model_check": "zsjax.model_check:run",
    "rl": "zsjax.train_rl:run",
    "sft": "zsjax.train_sft:run",
    "eval": "zsjax.evaluate:run",
    "sim_tuning": "zsjax.sim_tuning:run",
    "tiny_world": "zsjax.pipeline:run",
}


def run_job(config, workdir: str):
  sharding.initialize_distributed(config.get("distributed"))
  job = config.get("job")
  if job not in JOBS:
    raise app.UsageError(
        f"config.job={job!r} is not a known job; choose one of {sorted(JOBS)} "
        "(set it in the config file or with --config.job=...).")
  module, function = JOBS[job].split(":")
  return getattr(importlib.import_module(module), function)(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; settings go through --config.field=value.")
  report = run_job(_CONFIG.value, _WORKDIR.value)
  if isinstance(report, dict) and report.get("ok") is False:
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
