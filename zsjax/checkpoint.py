"""Checkpoints with Orbax: save, keep the last k, resume (sharded), export to HF.

A checkpoint holds a pytree of arrays (e.g. ``zsjax.train_step.TrainState``:
step, params, optimizer state; a PPO critic's too) and a JSON dict of
everything else a resumed run needs (data position, rng seed words, config).
Restoring takes an abstract target (``jax.ShapeDtypeStruct`` with shardings),
so each process reads only its own shards.

A save's blocking part and the wait for a background save run with SIGINT and
SIGTERM held back (``zsjax.interrupts.deferred``): an interrupt lands between
steps, never inside a write. A resume reads the newest *intact* checkpoint: one
that Orbax cannot read, or whose arrays hold NaN or infinity (flipped bits in a
weight file), is moved to ``checkpoints.damaged/<step>`` (nothing is deleted),
named on the console, and the previous step is tried.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from zsjax import hf, interrupts, template


def abstract_like(tree, shardings=None):
  """``ShapeDtypeStruct`` tree of ``tree`` (arrays or structs), with ``shardings``
  (a matching NamedSharding tree) or each array's own sharding."""
  if shardings is None:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                tree, shardings)


def check_checkpoint_config(checkpoint: Any) -> None:
  """``config.checkpoint``: ``every`` and ``max_to_keep`` at least 1."""
  if checkpoint.every < 1:
    raise ValueError(f"config.checkpoint.every={checkpoint.every} must be >= 1 (steps between "
                     "checkpoints; the last step is always saved).")
  if checkpoint.max_to_keep < 1:
    raise ValueError(f"config.checkpoint.max_to_keep={checkpoint.max_to_keep} must be >= 1.")


class Checkpointer:
  """Orbax ``CheckpointManager`` under ``directory`` keeping the last ``max_to_keep``."""

  def __init__(self, directory: str | Path, max_to_keep: int = 3, async_save: bool = True):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep} must be >= 1.")
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save))

  @classmethod
  def from_config(cls, directory: str | Path, checkpoint) -> "Checkpointer":
    """From a ``config.checkpoint`` section (``max_to_keep``, ``async_save``)."""
    return cls(directory, max_to_keep=checkpoint.max_to_keep, async_save=checkpoint.async_save)

  def save(self, step: int, state, extra: dict[str, Any] | None = None, force: bool = False) -> bool:
    """Saves ``state`` (arrays) and ``extra`` (JSON) as ``step``; asynchronous
    unless disabled: ``wait`` before reading it back or exiting."""
    with interrupts.deferred():
      return self.manager.save(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra or {})),
          force=force)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def latest(self) -> str:
    """The last complete checkpoint in words, for messages: ``"step 40"``, or that
    there is none yet and a rerun starts from the beginning."""
    step = self.latest_step()
    return f"step {step}" if step is not None else "none yet (a rerun starts from step 0)"

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore(self, target, step: int | None = None) -> tuple[Any, dict]:
    """``(state, extra)`` of ``step`` (default: the latest). ``target``: the state's
    abstract tree (``abstract_like``), which sets structure, dtypes and shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory} to restore.")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
    return restored.state, dict(restored.extra or {})

  def latest_extra(self) -> dict | None:
    """The JSON part of the newest checkpoint whose JSON part reads (without its
    arrays), or None when there is none: what a resume checks before asking Orbax
    for the state."""
    for step in sorted(self.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            extra=ocp.args.JsonRestore()))
      except Exception:  # a damaged step: restore_or names it and falls back
        continue
      return dict(restored.extra or {})
    return None

  def restore_raw(self, step: int | None = None) -> Any:
    """The saved array tree of ``step`` (default: the latest) without a target:
    nested dicts of host arrays (e.g. ``raw["policy"]["params"]`` of an RL run)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory} to restore.")
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state

  def refuse_other_run(self, workdir, key: str, value, field: str) -> None:
    """Before a resume: when the latest checkpoint's JSON part records another
    ``key`` than ``value`` (the config's ``field``), closes and raises ValueError."""
    saved = self.latest_extra()  # read without the arrays
    if saved is not None and saved.get(key, value) != value:
      self.close()
      raise ValueError(f"{workdir} holds a {saved[key]!r} run (checkpoint step "
                       f"{saved.get('step')}); {field}={value!r}. Use a new --workdir, or the "
                       f"{key} the run started with.")

  def refuse_changed_inputs(self, workdir, inputs: dict) -> None:
    """Before a resume: when an input the latest checkpoint recorded (its path and
    content fingerprint, ``workdir.input_fingerprints``) has other contents now,
    closes and raises ``workdir.RunMismatch`` naming it."""
    from zsjax import workdir as workdir_lib
    saved = self.latest_extra()
    if saved is None:
      return
    try:
      workdir_lib.refuse_changed_inputs(workdir, saved.get("inputs"), inputs,
                                        f"checkpoint step {saved.get('step')}")
    except workdir_lib.RunMismatch:
      self.close()
      raise

  def refuse_other_horizon(self, workdir, horizon: int, total_steps: int, section: str) -> None:
    """Before a resume: when the latest checkpoint's schedules span another number
    of steps than ``horizon`` (``{section}.schedule_steps``, else ``total_steps``),
    closes and raises ValueError naming the recorded horizon and the fix."""
    saved = self.latest_extra()
    if saved is None or saved.get("schedule_steps", horizon) == horizon:
      return
    self.close()
    raise ValueError(horizon_message(workdir, saved["schedule_steps"], horizon, total_steps,
                                     section, f"checkpoint step {saved.get('step')}"))

  def restore_or(self, target, fallback, log=print) -> tuple[Any, dict, bool]:
    """Resume: the newest intact checkpoint if there is one, else ``fallback()``'s
    state. Returns ``(state, extra, resumed)``. Damaged steps newer than the one
    restored are moved to ``checkpoints.damaged/`` and ``log``ged; when every step
    is damaged nothing is moved and a RuntimeError names them all."""
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return fallback(), {}, False
    damaged = []
    for step in steps:
      try:
        state, extra = self.restore(target, step)
      except Exception as e:  # Orbax / TensorStore: a torn, truncated or missing file
        if not _is_damage(e):  # out of memory, a storage error: not the checkpoint's fault
          raise
        damaged.append((step, _first_line(e)))
        if jax.process_count() > 1:  # processes must agree: no fallback, say what to do
          break
        continue
      bad = non_finite_leaves(state)
      if bad:
        damaged.append((step, f"non-finite values in {', '.join(bad[:3])}"
                              f"{' …' if len(bad) > 3 else ''}"))
        continue
      if damaged and jax.process_count() > 1:
        break
      if damaged:
        self._set_aside(damaged, restored=step, log=log)
      return state, extra, True
    listed = "; ".join(f"step {s}: {why}" for s, why in damaged)
    if jax.process_count() > 1:
      raise RuntimeError(
          f"checkpoint {listed} in {self.directory} is damaged. A run of several processes "
          f"does not fall back on its own: move that step's directory out of "
          f"{self.directory} (e.g. to {self.directory}.damaged/) and rerun; it resumes from "
          "the newest step left.")
    raise RuntimeError(
        f"every checkpoint in {self.directory} is damaged ({listed}). Nothing was moved. To "
        f"start again from step 0, move the directory aside (mv {self.directory} "
        f"{self.directory}.damaged), or restore it from a backup.")

  def _set_aside(self, damaged, restored: int, log) -> None:
    real = self.directory.resolve()  # beside the real directory: a rename, not a copy
    aside = real.with_name(real.name + ".damaged")
    if jax.process_index() == 0:
      aside.mkdir(exist_ok=True)
      for step, _ in damaged:
        source = real / str(step)
        target, n = aside / str(step), 1
        while target.exists():  # an earlier resume set a step of this number aside
          target, n = aside / f"{step}.{n}", n + 1
        source.rename(target)
    self.manager.reload()
    for step, why in damaged:
      log(f"checkpoint step {step} in {self.directory} is damaged ({why}); moved to {aside}/. "
          f"Resuming from step {restored}, the newest intact checkpoint.")

  def wait(self) -> None:
    with interrupts.deferred():
      self.manager.wait_until_finished()

  def close(self) -> None:
    with interrupts.deferred():
      self.manager.wait_until_finished()
      self.manager.close()

  @staticmethod
  def step_body(name: str, step: int) -> interrupts.deferred:
    """``with``-body of a training loop's step ``step``: a signal waits for it to end
    (then ``close_on_interrupt`` saves it, with one process), a second stops it at once."""
    saving = " (then saving it)" if jax.process_count() == 1 else ""
    return interrupts.deferred(f"{name} step {step}{saving}", escalate=True)

  def close_on_interrupt(self, error: KeyboardInterrupt, name: str, step: int, done: int,
                         state, extra_at, log) -> None:
    """A training loop's Ctrl-C / SIGTERM path: the save in flight completes; a loop
    stopped between steps (``step == done``, ``state`` that step's) saves that step, so
    the steps since the last periodic checkpoint are kept; one stopped within a step
    (an exception raised in it, or a second signal) keeps the last complete checkpoint,
    since its state may be half-updated. With several processes each may stop after
    another step and a save is a collective: only the saves already in flight complete.
    ``log`` gets the line naming where it stopped and the last complete checkpoint."""
    self.wait()
    if step == done and done > (self.latest_step() or 0) and jax.process_count() == 1:
      self.save(done, state, extra=extra_at(done), force=True)
    self.close()
    where = f"after {name} step {step}" if step == done else f"during {name} step {step}"
    log(f"{interrupts.describe(error)} {where}; the last complete checkpoint: "
        f"{self.latest()}. Rerun the same command to resume.")


def horizon_message(workdir, recorded: int, horizon: int, total_steps: int, section: str,
                    where: str) -> str:
  """Why a resume whose schedules would span another number of steps is refused."""
  return (f"{workdir} holds a run whose learning-rate schedule and noise curriculum span "
          f"{recorded} steps ({where}); this one would lay them over {horizon} "
          f"({section}.total_steps={total_steps}), so the steps it already trained would no "
          f"longer be on its schedule. To go on with the recorded schedules (their end values "
          f"hold past step {recorded}), add --{section}.schedule_steps="
          f"{recorded}; or use a new --workdir.")


_NOT_DAMAGE = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


def _is_damage(error: BaseException) -> bool:
  """Whether a restore error says the checkpoint itself is unreadable (torn,
  truncated, garbled, missing files), not that memory or storage failed."""
  if isinstance(error, MemoryError):
    return False
  if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and \
      error.errno in (errno.EIO, errno.ESTALE, errno.EACCES, errno.ENOSPC):
    return False
  return not any(word in str(error) for word in _NOT_DAMAGE)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def non_finite_leaves(tree) -> list[str]:
  """Paths of the floating-point leaves of ``tree`` that hold a NaN or infinity."""
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact) and \
        not bool(jnp.all(jnp.isfinite(leaf))):
      bad.append(jax.tree_util.keystr(path))
  return bad


def export_hf(directory: str | Path, cfg, params, tokenizer,
              prompt_format: dict | None = None) -> Path:
  """A trained model and its tokenizer as an HF directory (``hf.save_checkpoint``);
  a policy's ``prompt_format`` (``chat_template``, ``instruction``) beside them
  (``template.save_prompt_format``)."""
  export = hf.save_checkpoint(directory, cfg, params)
  tokenizer.save_pretrained(str(export))
  if prompt_format is not None:
    template.save_prompt_format(export, **prompt_format)
  return export
