"""Test-wide settings. Must run before JAX is imported anywhere.

Eight fake CPU devices let sharding tests build real meshes on one CPU; tests that
do not shard use the first device only.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most tests spend their time compiling tiny programs, not running them: LLVM's
# optimizations off (--xla_backend_optimization_level=0) compile them ~30% faster
# (tests/test_sharding.py: 96 s against 135 s). A test that mostly runs (the CI-sized
# pipeline: ~2x slower unoptimized) runs itself in a child process at the default
# level: ``optimized`` below. ZSJAX_TEST_OPTIMIZED=1 keeps the default level.
OPT_FLAG = "--xla_backend_optimization_level=0"
_flags = os.environ.get("XLA_FLAGS", "").replace(OPT_FLAG, "").split()
if not os.environ.get("ZSJAX_TEST_OPTIMIZED"):
  _flags.append(OPT_FLAG)
os.environ["XLA_FLAGS"] = " ".join(_flags + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent compilation cache for the session and the subprocesses it starts
# (the CLI, kill/resume and pipeline tests): the tiny models' identical programs
# (the same update step, rollout and scoring pass built by many tests) compile
# once. It lives in a fresh directory, so every run starts cold and no result
# depends on an earlier run; compiled programs are the same either way.
# Under pytest-xdist (pytest.ini: two workers) each worker keeps its own: a worker
# inherits the controller's directory, and two processes writing one entry at once
# could leave the other a half-written file.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ or (
    os.environ.get("ZSJAX_TEST_XLA_CACHE") and os.environ.get("PYTEST_XDIST_WORKER")):
  import atexit
  import shutil
  import tempfile

  _cache = tempfile.mkdtemp(prefix="zsjax_test_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["ZSJAX_TEST_XLA_CACHE"] = _cache  # made here, not by the user
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def world(tmp_path_factory):
  """Paths of a tiny world (seed 0) built once for the whole session."""
  from zsjax import tinyworld

  return tinyworld.ensure(tmp_path_factory.mktemp("world"), seed=0)


# The longest test starts first: pytest-xdist's worksteal hands each worker a
# contiguous block of the collected tests and lets an idle worker take from the
# other's queue, so a 5-minute test that started late would end the suite alone.
# Only that one: with the next-longest tests (subprocess and two-process runs) also
# moved to the front, they ran beside the pipeline test's child and the suite took
# 1141 s against 1080 s with this order (stop 42, this box, one run each).
FIRST = ("tests/test_pipeline.py::test_ci_sized_pipeline_runs_every_stage",)


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: item.nodeid not in FIRST)  # stable: the rest keep their order


def optimized(test_file: str, test_name: str, tmp_path) -> bool:
  """Runs ``test_file::test_name`` in a child pytest at XLA's default optimization
  level (see OPT_FLAG) and returns True, or False inside that child (where the test
  body runs). Usage, first line of a test: ``if optimized(__file__, NAME, tmp_path): return``."""
  import re
  import subprocess
  import sys

  if os.environ.get("ZSJAX_TEST_OPTIMIZED"):
    return False
  env = dict(os.environ, ZSJAX_TEST_OPTIMIZED="1",
             XLA_FLAGS=os.environ["XLA_FLAGS"].replace(OPT_FLAG, "").strip())
  env.pop("PYTEST_XDIST_WORKER", None)
  done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                         f"{test_file}::{test_name}", f"--basetemp={tmp_path / 'child'}"],
                        env=env, capture_output=True, text=True, timeout=3600)
  # a skip in the child also exits 0: the test must have run and passed
  ran = re.search(r"^1 passed", done.stdout, re.M)
  assert done.returncode == 0 and ran, (done.stdout + done.stderr)[-6000:]
  return True


@pytest.fixture
def sigterm_raises():
  """SIGTERM raises ``zsjax.interrupts.Terminated`` (as under ``zsjax.main``) and SIGINT
  ``KeyboardInterrupt`` (as in a foreground run; a suite started in the background
  ignores it) for the test; the previous handlers are restored after it."""
  import signal

  from zsjax import interrupts
  previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  interrupts.install()
  signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  for s, handler in previous.items():
    signal.signal(s, handler)


@pytest.fixture(autouse=True)
def signals_put_back():
  """After every test: no ``zsjax.interrupts.deferred`` body left open and SIGINT's
  handler the one before the test (the default, or ignored when the suite was started
  in the background), so a test that leaves them otherwise fails by name: a leaked
  body would silently stop later tests' signals being held back."""
  import signal

  from zsjax import interrupts
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  yield
  depth = interrupts.deferred._depth
  handler, term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  interrupts.deferred._depth = 0
  for s, previous in before.items():
    signal.signal(s, previous)
  stale = isinstance(getattr(term, "__self__", None), interrupts.deferred)
  assert depth == 0 and handler is before[signal.SIGINT] and not stale, (
      f"the test left interrupts.deferred._depth={depth}, SIGINT's handler {handler!r} "
      f"(before it: {before[signal.SIGINT]!r}) and SIGTERM's {term!r}")
