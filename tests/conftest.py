"""Test-wide settings. Must run before JAX is imported anywhere.

Eight fake CPU devices let sharding tests build real meshes on one CPU; tests that
do not shard use the first device only.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def world(tmp_path_factory):
  """Paths of a tiny world (seed 0) built once for the whole session."""
  from zsjax import tinyworld

  return tinyworld.ensure(tmp_path_factory.mktemp("world"), seed=0)
