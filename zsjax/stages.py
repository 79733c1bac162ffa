"""Jobs made of stages: each stage writes under the workdir and is skipped when
its marker file exists, so a rerun resumes where it stopped.

``run_stage(run, stage)`` is the one runner: it checks the marker, times the
stage, logs it and, when the run has a ``StageCache``, keys the stage by the
config fields it declares it reads (``Stage.reads``) plus the keys of the stages
it builds on (``Stage.after``), holds the entry's lock while making it, and links
the entry into the workdir. ``zsjax.pipeline`` (the tiny world) and
``zsjax.sim_tuning`` are tables of ``Stage``s run through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import zsjax
from zsjax.workdir import without_later_defaults


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: ``make(run)`` writes ``run.workdir / marker`` last."""

  name: str
  marker: str  # relative to the workdir; its existence means the stage is done
  make: Callable[["StageRun"], None]
  reads: tuple[str, ...] = ()  # config fields the stage reads (its cache key)
  after: tuple[str, ...] = ()  # keys in run.keys the stage builds on
  cached: bool = True  # False: always made in the workdir (e.g. evaluation)


@dataclasses.dataclass
class StageRun:
  """A run of a table of stages over one config and workdir."""

  config: Any
  workdir: Path
  label: str  # the log prefix, e.g. "tiny_world"
  cache: "StageCache | None" = None
  common: tuple[str, ...] = ()  # config fields every stage's key includes
  seconds: dict = dataclasses.field(default_factory=dict)  # stage -> seconds it took
  reused: list = dataclasses.field(default_factory=list)  # stages another workdir made
  keys: dict = dataclasses.field(default_factory=dict)  # stage -> cache key
  shared: dict = dataclasses.field(default_factory=dict)  # what stages hand on (paths, ...)

  def log(self, message: str) -> None:
    if self.config.progress:
      print(f"[{self.label}] {message}", flush=True)

  def inputs(self, stage: Stage) -> dict:
    """The config fields and upstream keys that decide ``stage``'s output."""
    out = config_fields(self.config, *self.common, *stage.reads)
    # an upstream stage this run does not have (the reading stage when it is off)
    # leaves the key as it was before that stage existed
    out.update({name: self.keys[name] for name in stage.after if self.keys.get(name)})
    return out


def config_fields(config, *names) -> dict:
  """The named config fields as plain values, without the fields written into the
  config files later that hold the value the code used before
  (``workdir.LATER_FIELDS``): a stage keyed before them keeps its key."""
  fields = {name: config[name] for name in names}
  return without_later_defaults({name: value.to_dict() if hasattr(value, "to_dict") else value
                                 for name, value in fields.items()}, "")


class StageCache:
  """Stage outputs shared between workdirs, keyed by the config they depend on.

  ``key(name, inputs)`` digests a stage's inputs (config sections and the keys of
  the stages it reads) with the zsjax version; ``attach`` points
  ``workdir/<name>`` at ``root/<name>/<key>``. An entry is finished when the
  stage's marker exists in it; ``stage.json`` beside the outputs records the
  seconds it took and the inputs it was keyed on. A workdir's own finished stage
  directory (made without the cache) is moved into the cache on first use. The
  key covers configuration, not code: clear the cache after changing code that
  changes a stage's output. Making an entry holds an exclusive lock on
  ``root/<name>/<key>.lock`` (``fcntl.flock``): a run that needs an entry another
  run is making waits for it and then links it, so a sweep's points can be
  launched in parallel (on a shared file system, one whose locks reach every
  machine).
  """

  def __init__(self, root: str | os.PathLike):
    self.root = Path(root).absolute()

  @staticmethod
  def key(name: str, inputs: dict) -> str:
    text = json.dumps({"stage": name, "version": zsjax.__version__, "inputs": inputs},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

  def attach(self, workdir: Path, name: str, key: str, marker: str, seconds: dict) -> Path:
    """Links ``workdir/name`` to its entry (adopting a finished local one)."""
    link, entry = workdir / name, self.root / name / key
    if link.is_symlink():
      if link.resolve() != entry.resolve():
        raise ValueError(
            f"{link} links to {os.readlink(link)}, but this config's {name} stage is "
            f"{entry} (config.stage_cache={str(self.root)!r}); the config changed since this "
            f"workdir was made: use a new --workdir, or remove the link to recompute.")
      return entry
    if link.exists():
      if entry.exists() or not (workdir / marker).exists():
        return link  # the workdir's own (unfinished, or the cache has one): left alone
      entry.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(link), str(entry))
      if name in seconds:
        self.record(entry, workdir, seconds[name], "adopted from the workdir")
    entry.mkdir(parents=True, exist_ok=True)
    link.symlink_to(entry, target_is_directory=True)
    return entry

  @contextlib.contextmanager
  def lock(self, name: str, key: str, log=None):
    """Holds the exclusive lock of entry ``name/key`` (waiting for it if held)."""
    path = self.root / name / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
      try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        if log is not None:
          log(f"{name}: another run is making {path.with_suffix('')}; waiting for it")
        fcntl.flock(handle, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(handle, fcntl.LOCK_UN)

  @staticmethod
  def record(entry: Path, workdir: Path, stage_seconds: float, inputs) -> None:
    (entry / "stage.json").write_text(json.dumps(
        {"seconds": stage_seconds, "made_in": str(workdir.absolute()), "inputs": inputs},
        indent=2, default=str) + "\n")

  @staticmethod
  def made(entry: Path) -> dict | None:
    """``{"seconds", "made_in", "inputs"}`` of a finished entry, else None."""
    path = entry / "stage.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_stage(run: StageRun, stage: Stage) -> str | None:
  """Makes ``stage`` unless its marker exists; returns its cache key (None without
  a cache). With a cache the entry's lock is held from the check to the end of
  making it, and a stage another workdir made is added to ``run.reused``."""
  if run.cache is None or not stage.cached:
    _make(run, stage)
    return None
  inputs = run.inputs(stage)
  key = run.cache.key(stage.name, inputs)
  with run.cache.lock(stage.name, key, log=run.log):
    entry = run.cache.attach(run.workdir, stage.name, key, stage.marker, run.seconds)
    _make(run, stage, entry, inputs)
  run.keys[stage.name] = key
  return key


def _make(run: StageRun, stage: Stage, entry: Path | None = None, inputs=None) -> None:
  if (run.workdir / stage.marker).exists():
    made = StageCache.made(entry) if entry is not None else None
    if made is not None:
      run.seconds[stage.name] = made["seconds"]
      if made["made_in"] != str(run.workdir.absolute()):
        run.reused.append(stage.name)
    run.log(f"{stage.name}: output exists, skipped")
    return
  run.log(f"{stage.name} ...")
  start = time.perf_counter()
  stage.make(run)
  run.seconds[stage.name] = time.perf_counter() - start
  if entry is not None:
    StageCache.record(entry, run.workdir, run.seconds[stage.name], inputs)
  (run.workdir / "stage_seconds.json").write_text(json.dumps(run.seconds, indent=2) + "\n")
  run.log(f"{stage.name}: {run.seconds[stage.name]:.1f} s")


__all__ = ["Stage", "StageRun", "StageCache", "run_stage", "config_fields"]
