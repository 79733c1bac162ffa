"""Signals that end a run: Ctrl-C (SIGINT) and a scheduler's SIGTERM, handled alike.

``timeout``, docker, Kubernetes and SLURM preemption stop a process with SIGTERM,
whose default action kills it on the spot, losing a checkpoint save in flight.
``install()`` (called by ``zsjax.main``) turns SIGTERM into ``Terminated``, a
``KeyboardInterrupt``, so every loop's Ctrl-C path runs for it too: the save in
flight finishes and the last complete checkpoint is printed.

``deferred()`` holds both signals back while its body runs (the blocking part of
a checkpoint save, the wait for a background save, a training step) and raises the
held one when the body is done, so an interrupt never lands half-way through
writing a step; ``what`` names the body in the message a held signal prints; a
signal the process ignores (SIGINT in a background job) stays ignored. A
signal held while an interrupt is already being handled is dropped: the run is
stopping anyway. The handler only records a signal, never raises, so nothing can
interrupt the bookkeeping of nested bodies. Python runs a handler only between
bytecodes: a step blocked inside XLA sees the signal when it returns, as before.
Outside the main thread (where Python delivers no signals) both are no-ops.
"""

from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
  """The process received SIGTERM (a scheduler, ``timeout`` or ``kill``)."""

  def __init__(self, signum: int = signal.SIGTERM):
    super().__init__(f"received {signal.Signals(signum).name}")
    self.signum = signum


def exit_code(error: KeyboardInterrupt) -> int:
  """The shell's code for a process ended by the signal: 130 (SIGINT), 143 (SIGTERM)."""
  return 128 + getattr(error, "signum", signal.SIGINT)


def describe(error: KeyboardInterrupt) -> str:
  """``"interrupted (Ctrl-C)"`` or ``"stopped by SIGTERM"``, for messages."""
  if isinstance(error, Terminated):
    return f"stopped by {signal.Signals(error.signum).name}"
  return "interrupted (Ctrl-C)"


def _raise_for(signum: int) -> None:
  if signum == signal.SIGINT:
    raise KeyboardInterrupt
  raise Terminated(signum)


def _on_terminate(signum, frame):
  del frame
  _raise_for(signum)


def _main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


def install() -> None:
  """SIGTERM raises ``Terminated`` in the main thread from now on."""
  if _main_thread():
    signal.signal(signal.SIGTERM, _on_terminate)


class deferred:
  """``with deferred(what):`` SIGINT and SIGTERM arriving in the body are raised after it."""

  _depth = 0  # nested bodies: only the outermost installs and raises

  def __init__(self, what: str = "a checkpoint write"):
    self.what = what

  def __enter__(self):
    self.active = _main_thread() and deferred._depth == 0
    if _main_thread():
      deferred._depth += 1
    if self.active:
      self.pending: list[int] = []
      # a signal the process ignores (SIGINT in a job started in the background, or
      # under nohup) stays ignored
      self.previous = {s: signal.signal(s, self._hold) for s in SIGNALS
                       if signal.getsignal(s) is not signal.SIG_IGN}
    return self

  def _hold(self, signum, frame):
    del frame
    self.pending.append(signum)
    sys.stderr.write(f"zsjax: {signal.Signals(signum).name} received; finishing {self.what} "
                     "first (SIGKILL stops at once, losing it).\n")
    sys.stderr.flush()

  def __exit__(self, exc_type, exc, tb):
    if _main_thread():
      deferred._depth -= 1
    if not self.active:
      return False
    for s, handler in self.previous.items():
      signal.signal(s, handler)
    handling = isinstance(sys.exc_info()[1], KeyboardInterrupt)  # already stopping
    if self.pending and exc_type is None and not handling:
      _raise_for(self.pending[0])
    return False


__all__ = ["Terminated", "install", "deferred", "exit_code", "describe", "SIGNALS"]
