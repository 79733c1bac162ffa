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
signal the process ignores (SIGINT in a job started with ``&`` from a script) stays
ignored. In a training step's body (``escalate=True``) a second signal stops the
run at once, losing the step under way, so a step stuck on a slow server never
needs SIGKILL (the checkpoint write inside a step still finishes first). A
signal held while an interrupt is already being handled is dropped: the run is
stopping anyway. The handler raises only for a step's second signal, and only
while no nested body is open, so nothing interrupts a nested body's bookkeeping
(the counts are ordered so that a signal between any two statements leaves them
whole). Python runs a handler only between
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
  """``with deferred(what):`` SIGINT and SIGTERM arriving in the body are raised after it.

  ``escalate=True`` (a training step, which may wait minutes on a search server): a
  second signal while the body runs, outside any nested body (a checkpoint write),
  stops it at once, and the step under way is lost; the last complete checkpoint
  stands."""

  _depth = 0  # nested bodies: only the outermost installs and raises

  def __init__(self, what: str = "a checkpoint write", escalate: bool = False):
    self.what, self.escalate = what, escalate

  def __enter__(self):
    self.active = self.counted = self.closing = False
    if not _main_thread():
      return self
    if deferred._depth == 0:
      self.pending: list[int] = []
      self.previous = {}
      try:
        for s in SIGNALS:
          # a signal the process ignores (SIGINT in a job started with `&` from a
          # script) stays ignored
          previous = signal.getsignal(s)
          if previous is not signal.SIG_IGN:
            self.previous[s] = previous  # known before our handler is: restorable
            signal.signal(s, self._hold)
      except BaseException:  # a signal before every handler was in place
        self._restore()
        raise
      self.active = True
    self.counted = True  # before the count: a signal in between is only recorded
    deferred._depth += 1
    return self

  def _restore(self):
    for s, handler in self.previous.items():
      signal.signal(s, handler)

  def _hold(self, signum, frame):
    if self.closing:  # left installed by an exit a signal cut short: put back, pass on
      self._restore()
      handler = self.previous.get(signum)
      if callable(handler):
        return handler(signum, frame)
      if handler is not signal.SIG_IGN:
        _raise_for(signum)
      return None
    if self.pending and self.escalate and self.counted and deferred._depth == 1:
      # the second signal, and no checkpoint write open inside the body: stop now (the
      # body stays active: were this raise lost, in a finalizer, its exit raises the first)
      self.escalate = self.counted = False
      deferred._depth -= 1
      self._restore()
      _raise_for(signum)
    self.pending.append(signum)
    again = ("; send it again to stop at once, losing it" if self.escalate
             else " (SIGKILL stops at once, losing it)")
    sys.stderr.write(f"zsjax: {signal.Signals(signum).name} received; finishing {self.what} "
                     f"first{again}.\n")
    sys.stderr.flush()

  def __exit__(self, exc_type, exc, tb):
    self.escalate = False  # from here on a signal is only recorded
    if self.counted:
      self.counted = False
      deferred._depth -= 1
    self.closing = self.active  # from here on a signal goes to the handler put back
    if not self.active:
      return False
    self._restore()
    handling = isinstance(sys.exc_info()[1], KeyboardInterrupt)  # already stopping
    if self.pending and exc_type is None and not handling:
      _raise_for(self.pending[0])
    return False


__all__ = ["Terminated", "install", "deferred", "exit_code", "describe", "SIGNALS"]
