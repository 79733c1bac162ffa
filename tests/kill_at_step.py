"""Test-only: runs ``zsjax.main`` and kills the process (SIGKILL) in the middle of
RL step N, after its rollout and before its update (a crash for the resume test).

  python tests/kill_at_step.py N --config=... --workdir=... [--config.field=value ...]

The hook wraps ``zsjax.train_rl.score_answers``, which the loop calls once a step;
a fresh run's N-th call is step N. Nothing of it is in the library."""

import os
import signal
import sys

from absl import app

from zsjax import main, train_rl


def kill_at(step: int) -> None:
  original, calls = train_rl.score_answers, [0]

  def score_then_kill(*args, **kwargs):
    calls[0] += 1
    if calls[0] == step:
      os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)

  train_rl.score_answers = score_then_kill


if __name__ == "__main__":
  kill_at(int(sys.argv[1]))
  app.run(main.main, argv=[sys.argv[0]] + sys.argv[2:])
