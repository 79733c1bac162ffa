"""Metrics: TensorBoard event files and JSON lines, written by process 0.

Names are slash-separated (``reward/f1``, ``loss/kl``, ``time/rollout_s``). Values
may be device arrays: ``write_later`` keeps a step's metrics on device and
fetches them when the next step's arrive, so the host never waits on the device
in the middle of a training loop (``flush`` writes the last ones).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from tqdm import tqdm


def _scalar(name: str, value: Any) -> float:
  array = np.asarray(jax.device_get(value))
  if array.size != 1:
    raise ValueError(f"metric {name!r} has shape {array.shape}; metrics must be scalars.")
  return float(array.reshape(()))


class MetricWriter:
  """Writes ``{name: scalar}`` per step to ``WORKDIR/tensorboard`` and
  ``WORKDIR/metrics.jsonl`` (one object per step: ``{"step": s, name: value}``)."""

  def __init__(self, workdir: str | Path, enabled: bool | None = None,
               resume_from: int | None = None):
    """``resume_from``: a run restarted from the checkpoint of that step first drops
    the ``metrics.jsonl`` records of later steps (written before the restart)."""
    if enabled is None:
      enabled = jax.process_index() == 0
    self.enabled = enabled
    self.workdir = Path(workdir)
    self._pending: tuple[int, Mapping[str, Any]] | None = None
    self._tb = None
    self._jsonl = None
    if enabled:
      from tensorboard.summary import Writer

      self.workdir.mkdir(parents=True, exist_ok=True)
      jsonl = self.workdir / "metrics.jsonl"
      if resume_from is not None:
        drop_steps_after(jsonl, resume_from)
      else:
        drop_torn_tail(jsonl)
      self._tb = Writer(str(self.workdir / "tensorboard"))
      self._jsonl = open(jsonl, "a", encoding="utf-8")

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Writes now (fetching device values); returns the floats written."""
    values = {}
    for name, value in metrics.items():
      if "/" not in name:
        raise ValueError(f"metric name {name!r} is not slash-named; use e.g. 'train/{name}'.")
      values[name] = _scalar(name, value)
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
      raise FloatingPointError(f"step {step}: metric(s) {bad} are not finite.")
    if self.enabled:
      for name, value in values.items():
        self._tb.add_scalar(name, value, step=int(step))
      self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
      self._jsonl.flush()
    return values

  def write_later(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float] | None:
    """Keeps this step's (device) metrics and writes the previous step's."""
    written = self.flush()
    self._pending = (step, dict(metrics))
    return written

  def flush(self) -> dict[str, float] | None:
    written = None
    if self._pending is not None:
      step, metrics = self._pending
      self._pending = None
      written = self.write(step, metrics)
    if self.enabled:
      self._tb.flush()
    return written

  def close(self) -> None:
    self.flush()
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def console(message: str) -> None:
  """A line on the console (stderr) that does not break a progress bar."""
  tqdm.write(message, file=sys.stderr)


def drop_steps_after(path: str | Path, step: int) -> None:
  """Rewrites a JSON-lines file of ``{"step": s, ...}`` records without those of
  steps after ``step`` (what a run wrote past the checkpoint it resumes from)."""
  path = Path(path)
  if path.exists():
    kept = [r for r in read_jsonl(path, torn_tail="drop") if r["step"] <= step]
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in kept))
    partial.replace(path)  # a crash mid-rewrite leaves the old file, never half of it


def drop_torn_tail(path: str | Path) -> bool:
  """Cuts a JSON-lines file back to its last complete record when its last line is
  a cut-off write (not valid JSON, or no newline after it), so appending resumes on
  a clean line. Returns whether it cut."""
  path = Path(path)
  if not path.exists():
    return False
  data = path.read_bytes()
  body = data.rstrip(b"\n")
  start = body.rfind(b"\n") + 1
  last = body[start:]
  try:
    json.loads(last) if last.strip() else None
    complete = data.endswith(b"\n") or not last.strip()
  except ValueError:
    complete = False
  if complete:
    return False
  logging.warning("%s: dropped a partial last line (%d bytes; a write was cut off)", path,
                  len(last))
  with open(path, "r+b") as f:
    f.truncate(start)
  return True


def read_jsonl(path: str | Path, torn_tail: str = "raise") -> list[dict]:
  """The records of a JSON-lines file (``metrics.jsonl``, trajectories, pairs).

  A last line that is not valid JSON is what a kill or a full disk leaves in the
  middle of a write: ``torn_tail="drop"`` drops it with a warning (a resume does),
  ``"raise"`` reports it. A bad line before the last is always an error naming the
  file and line."""
  with open(path, encoding="utf-8") as f:
    lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
  records = []
  for i, (number, line) in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1 and torn_tail == "drop":
        logging.warning("%s: dropped a partial last line %d (%d bytes; a write was cut off): %r",
                        path, number, len(line), line[:80])
        break
      where = "its last line" if i == len(lines) - 1 else f"line {number}"
      raise ValueError(f"{path}: {where} is not valid JSON ({e.msg}); a cut-off last line is "
                       "dropped on resume, a bad line before it means the file was edited or "
                       "corrupted.") from None
  return records


def metrics_at(workdir: str | Path, step: int) -> dict:
  """The metrics ``WORKDIR/metrics.jsonl`` recorded for ``step`` (without ``step`` and
  ``time``), or {}: what a rerun of a finished run, which trains nothing, puts in
  its summary."""
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return {}
  records = [r for r in read_jsonl(path, torn_tail="drop") if r.get("step") == step]
  return {k: v for k, v in records[-1].items() if k not in ("step", "time")} if records else {}


# jax.monitoring's events for turning a traced program into an executable: lowering
# to StableHLO and the backend's compile (tracing is left out: a nested jit's trace
# is reported inside its caller's, so summing traces would count it twice).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_compile_total = [0.0]
_compile_listening = [False]


def _on_duration(event: str, seconds: float, **_) -> None:
  if event in COMPILE_EVENTS:
    _compile_total[0] += seconds


def compile_seconds() -> float:
  """Seconds this process has spent lowering and compiling JAX programs since the
  first call (a ``jax.monitoring`` listener, registered then). The difference of
  two readings is the compile time inside a phase, so a step's first-call time
  can be split into compiling and running (``time/*_compile_s``)."""
  if not _compile_listening[0]:
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _compile_listening[0] = True
  return _compile_total[0]
