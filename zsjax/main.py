"""zsjax entry point.

  python -m zsjax.main --config=configs/<name>.py[:arg] --workdir=DIR [--config.field=value ...]

The config's ``job`` field picks what runs; each job is ``run(config, workdir)``
in its own module, imported only when chosen. A job holds its workdir's lock
while it runs, and a resumable job's settings are checked against the run the
workdir holds (``zsjax.workdir``). Library logs stay off the console unless
``--verbosity`` is given; a full disk ends the job with one line saying so. Ctrl-C
and SIGTERM end it with the last complete checkpoint named and exit codes 130 and
143 (``zsjax.interrupts``).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import sys

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from zsjax import interrupts, search, sharding
from zsjax import workdir as workdir_lib



def define_flags(flag_values: flags.FlagValues = flags.FLAGS, argv=None):
  """``--config`` (a config file, its fields overridable as ``--config.a.b=v``, read
  from ``argv``, default ``sys.argv``) and ``--workdir`` on ``flag_values``: their holders."""
  config = config_flags.DEFINE_config_file(
      "config", None, "Path to a configs/<name>.py file, optionally ':arg'.", lock_config=True,
      flag_values=flag_values, sys_argv=argv)
  workdir = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, logs, results).",
                                flag_values=flag_values)
  return config, workdir


_CONFIG, _WORKDIR = define_flags()

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
  if not workdir or not str(workdir).strip():
    raise app.UsageError(f"--workdir={workdir!r} is empty; give the directory the run writes "
                         "into (checkpoints, logs, results), e.g. --workdir=/tmp/zsjax_run.")
  sharding.initialize_distributed(config.distributed)
  job = config.job
  if job not in JOBS:
    raise app.UsageError(
        f"config.job={job!r} is not a known job; choose one of {sorted(JOBS)} "
        "(set it in the config file or with --config.job=...).")
  module, function = JOBS[job].split(":")
  run = getattr(importlib.import_module(module), function)
  # Process 0 holds the lock and checks the run; every process learns its verdict,
  # so a refusal stops them all instead of leaving the others waiting for it.
  with contextlib.ExitStack() as stack:
    refusal = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(workdir_lib.lock(workdir))
        workdir_lib.check_identity(workdir, config, log=lambda m: print(m, file=sys.stderr))
      except (workdir_lib.WorkdirBusy, workdir_lib.RunMismatch) as e:
        refusal = e
    if jax.process_count() > 1:
      refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
      if refused and refusal is None:
        raise workdir_lib.RunMismatch(f"process 0 refused {workdir}; its log says why.")
    if refusal is not None:
      raise refusal
    return run(config, workdir)


def _no_space(error: BaseException) -> OSError | None:
  """The 'no space left on device' error in an exception's chain, if any (also
  when a library re-raised it as text, as a background save thread may)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return error
    if "No space left on device" in str(error):
      return OSError(errno.ENOSPC, "No space left on device", None)
    error = error.__cause__ or error.__context__
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; settings go through --config.field=value.")
  if not flags.FLAGS["verbosity"].present:  # Orbax's INFO lines would bury the progress bar
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)  # libraries logging through the root logger
  interrupts.install()  # SIGTERM ends a run as Ctrl-C does: the step under way finishes
  try:
    report = run_job(_CONFIG.value, _WORKDIR.value)
  except (workdir_lib.WorkdirBusy, workdir_lib.RunMismatch, search.EngineError) as e:
    print(f"zsjax: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt as e:  # the loop that was running printed where it stopped
    print(f"zsjax: {interrupts.describe(e)}.", file=sys.stderr)
    sys.exit(interrupts.exit_code(e))
  except BaseException as e:
    full = _no_space(e)
    if full is None:
      raise
    where = full.filename or _WORKDIR.value
    sys.stderr.write(f"zsjax: no space left on device while writing {where} ({full.strerror}). "
                     "Free space on that disk and rerun the same command: the run resumes "
                     "from its last complete checkpoint.\n")
    sys.stderr.flush()
    os._exit(1)  # no shutdown noise after the one line that matters
  if isinstance(report, dict) and report.get("ok") is False:
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
