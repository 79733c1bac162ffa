"""Signals and damaged checkpoints: SIGINT/SIGTERM held back while a checkpoint
is written or a step runs (a second signal stops a step at once), and a resume
that falls back to the newest intact checkpoint."""

import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from zsjax import checkpoint as C
from zsjax import interrupts


def test_sigterm_raises_terminated_with_its_exit_code(sigterm_raises):
  with pytest.raises(interrupts.Terminated) as caught:
    os.kill(os.getpid(), signal.SIGTERM)
  assert isinstance(caught.value, KeyboardInterrupt)  # every Ctrl-C path handles it
  assert interrupts.exit_code(caught.value) == 143
  assert interrupts.describe(caught.value) == "stopped by SIGTERM"
  assert interrupts.exit_code(KeyboardInterrupt()) == 130


@pytest.mark.parametrize("signum,error", [(signal.SIGTERM, interrupts.Terminated),
                                          (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_in_a_deferred_body_is_raised_after_it(sigterm_raises, signum, error, capsys):
  done = []
  with pytest.raises(error):
    with interrupts.deferred():
      with interrupts.deferred():  # nested: still held until the outer body ends
        os.kill(os.getpid(), signum)
        done.append("inner")
      done.append("outer")
  assert done == ["inner", "outer"]
  assert "received; finishing a checkpoint write first" in capsys.readouterr().err
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back


def test_a_second_signal_in_a_step_body_stops_it_at_once_but_not_a_write(sigterm_raises,
                                                                          capsys):
  done = []
  with pytest.raises(interrupts.Terminated):
    with interrupts.deferred("step 3", escalate=True):
      os.kill(os.getpid(), signal.SIGTERM)
      done.append("held")
      os.kill(os.getpid(), signal.SIGTERM)  # the second: raised here
      done.append("finished")
  assert done == ["held"] and interrupts.deferred._depth == 0
  assert "finishing step 3 first; send it again to stop at once" in capsys.readouterr().err
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back
  assert signal.getsignal(signal.SIGTERM) is interrupts._on_terminate
  # inside a checkpoint write (a nested body) both are held: the write finishes
  done = []
  with pytest.raises(KeyboardInterrupt):
    with interrupts.deferred("step 4", escalate=True):
      with interrupts.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        done.append("written")
      done.append("finished")
  assert done == ["written", "finished"] and interrupts.deferred._depth == 0
  # later bodies hold signals again; a second signal whose raise is lost (caught here,
  # as a finalizer would swallow it) still stops the run when the body ends
  with pytest.raises(interrupts.Terminated):
    with interrupts.deferred("step 5", escalate=True):
      os.kill(os.getpid(), signal.SIGTERM)
      done.append("step 5")
      pytest.raises(interrupts.Terminated, os.kill, os.getpid(), signal.SIGTERM)
      done.append("step 5 went on")
  assert done[-2:] == ["step 5", "step 5 went on"] and interrupts.deferred._depth == 0
  assert signal.getsignal(signal.SIGTERM) is interrupts._on_terminate


def test_a_handler_left_by_an_interrupted_exit_puts_itself_back(sigterm_raises):
  body = interrupts.deferred("step 1", escalate=True)
  body.__enter__()
  body.closing = True  # as if a signal cut its exit short before SIGTERM was put back
  with pytest.raises(interrupts.Terminated):  # the next SIGTERM: passed on, not swallowed
    os.kill(os.getpid(), signal.SIGTERM)
  assert signal.getsignal(signal.SIGTERM) is interrupts._on_terminate
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  interrupts.deferred._depth = 0  # the body never exited


def test_an_ignored_signal_stays_ignored_in_a_deferred_body(sigterm_raises):
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a job started in the background
  with interrupts.deferred():
    os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  with pytest.raises(interrupts.Terminated):  # SIGTERM is still held and raised after
    with interrupts.deferred():
      os.kill(os.getpid(), signal.SIGTERM)
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_signal_while_already_stopping_is_dropped(sigterm_raises):
  with pytest.raises(KeyboardInterrupt) as caught:
    try:
      raise KeyboardInterrupt
    except KeyboardInterrupt:
      with interrupts.deferred():  # e.g. the wait for a save after Ctrl-C
        os.kill(os.getpid(), signal.SIGTERM)
      raise
  assert not isinstance(caught.value, interrupts.Terminated)


def test_sigterm_during_a_save_lets_the_save_finish(tmp_path, sigterm_raises, monkeypatch):
  ck = C.Checkpointer(tmp_path, async_save=True)
  manager_save = ck.manager.save

  def signalled_save(*args, **kwargs):  # the signal lands in the blocking part
    os.kill(os.getpid(), signal.SIGTERM)
    return manager_save(*args, **kwargs)

  monkeypatch.setattr(ck.manager, "save", signalled_save)
  with pytest.raises(interrupts.Terminated):
    ck.save(1, {"w": jnp.arange(4.0)}, extra={"step": 1})
  ck.close()
  state, extra = C.Checkpointer(tmp_path).restore({"w": jnp.zeros(4)})
  assert extra == {"step": 1}
  np.testing.assert_array_equal(state["w"], np.arange(4.0))


def _three_steps(directory):
  ck = C.Checkpointer(directory, max_to_keep=5, async_save=False)
  for step in (1, 2, 3):
    ck.save(step, {"w": jnp.full((8,), float(step))}, extra={"step": step})
  ck.close()


def _scramble(step_dir):
  for root, _, files in os.walk(step_dir / "state"):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        size = os.path.getsize(path)
        f.write(b"\x00\xff" * max(size // 2, 1))


def test_a_resume_falls_back_past_damaged_checkpoints_and_sets_them_aside(tmp_path):
  _three_steps(tmp_path / "checkpoints")
  _scramble(tmp_path / "checkpoints" / "3")  # torn files: Orbax cannot read it
  ck = C.Checkpointer(tmp_path / "checkpoints", max_to_keep=5)
  ck.manager.save(4, args=C.ocp.args.Composite(  # flipped bits: a NaN in the weights
      state=C.ocp.args.StandardSave({"w": jnp.full((8,), jnp.nan)}),
      extra=C.ocp.args.JsonSave({"step": 4})))
  ck.wait()
  lines = []
  state, extra, resumed = ck.restore_or({"w": jnp.zeros(8)}, fallback=lambda: None,
                                        log=lines.append)
  assert resumed and extra == {"step": 2}
  np.testing.assert_array_equal(state["w"], np.full(8, 2.0))
  assert len(lines) == 2 and "step 4" in lines[0] and "non-finite values in ['w']" in lines[0]
  assert "step 3" in lines[1] and "Resuming from step 2" in lines[1]
  assert sorted(p.name for p in (tmp_path / "checkpoints.damaged").iterdir()) == ["3", "4"]
  assert ck.all_steps() == [1, 2]
  ck.save(3, {"w": jnp.full((8,), 30.0)}, extra={"step": 3})  # the run goes on from step 2
  ck.close()
  assert C.Checkpointer(tmp_path / "checkpoints").restore({"w": jnp.zeros(8)})[1] == {"step": 3}


def test_every_checkpoint_damaged_is_named_and_nothing_moves(tmp_path):
  _three_steps(tmp_path)
  for step in (1, 2, 3):
    _scramble(tmp_path / str(step))
  ck = C.Checkpointer(tmp_path)
  assert ck.latest_extra() == {"step": 3}  # the JSON part still reads
  with pytest.raises(RuntimeError, match=r"every checkpoint in .* is damaged \(step 3: .*step 2: "
                                         r".*step 1: .*\)\. Nothing was moved\..*mv "):
    ck.restore_or({"w": jnp.zeros(8)}, fallback=lambda: None)
  assert ck.all_steps() == [1, 2, 3]


def test_only_an_unreadable_checkpoint_counts_as_damaged(tmp_path, monkeypatch):
  """Out of memory or a storage error while restoring is raised as it is, nothing
  moved; a checkpoints directory that is a symlink sets damaged steps aside beside
  its real directory."""
  assert not C._is_damage(MemoryError())
  assert not C._is_damage(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 GB"))
  assert not C._is_damage(OSError(5, "Input/output error"))
  assert C._is_damage(ValueError("Error opening 'zarr' driver: unexpected end of data"))
  assert C._is_damage(FileNotFoundError(2, "No such file", "_METADATA"))

  real = tmp_path / "disk" / "checkpoints"
  _three_steps(real)
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "checkpoints").symlink_to(real)
  ck = C.Checkpointer(tmp_path / "run" / "checkpoints")

  def out_of_memory(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")

  monkeypatch.setattr(ck, "restore", out_of_memory)
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    ck.restore_or({"w": jnp.zeros(8)}, fallback=lambda: None)
  assert ck.all_steps() == [1, 2, 3]
  monkeypatch.undo()
  _scramble(real / "3")
  _, extra, _ = ck.restore_or({"w": jnp.zeros(8)}, fallback=lambda: None, log=lambda m: None)
  assert extra == {"step": 2} and (tmp_path / "disk" / "checkpoints.damaged" / "3").is_dir()
  ck.close()
