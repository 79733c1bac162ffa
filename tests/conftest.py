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


# The longest tests start first, longest first: pytest-xdist's worksteal hands each
# worker a contiguous block of the collected tests and lets an idle worker take from
# the end of the other's queue, so a long test that started late would end the suite
# alone; with the long ones first, the suite ends on short tests that balance the two
# workers. Durations measured on this box (stop 41, `--durations=25`); a test not
# listed keeps its collected place after them.
FIRST = (
    "tests/test_pipeline.py::test_ci_sized_pipeline_runs_every_stage",  # ~300 s
    "tests/test_accelerator_check.py::test_reduced_accelerator_check_measures_every_part",
    "tests/test_bench_sharding.py::test_benchmark_table_files_and_summary_line",
    "tests/test_bench_rollout.py::test_rollout_benchmark_runs_every_loop_on_the_same_work",
    "tests/test_sim_tuning.py::test_sim_tuning_job_runs_every_stage_and_resumes",
    "tests/test_fault_drill.py::test_short_fault_drill",
    "tests/test_multiprocess.py::test_two_processes_match_one",
    "tests/test_train_rl.py::test_other_algorithms_and_engines_run[ppo-simulator]",
    "tests/test_train_rl.py::test_nan_loss_stops_naming_step_and_metric_and_saves_nothing_corrupt",
    "tests/test_packing.py::test_a_packed_step_equals_the_padded_step[ppo-token_mean]",
    "tests/test_train_sft.py::test_the_early_stop_cools_down_after_its_check_and_resumes_on_the_same_schedule",
    "tests/test_train_sft.py::test_focus_draws_rows_of_the_worst_group_and_resumes_the_same",
    "tests/test_packing.py::test_packing_benchmark_writes_its_table_and_summary",
    "tests/test_rollout.py::test_sharded_rollout_matches_one_device",
    "tests/test_configs.py::test_model_check_runs_sharded_on_eight_devices",
    "tests/test_sweep.py::test_two_point_sweep_runs_resumes_and_collects",
)


def pytest_collection_modifyitems(config, items):
  rank = {nodeid: i for i, nodeid in enumerate(FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid, len(FIRST)))  # stable: the rest keep their order


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
