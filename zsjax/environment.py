"""What a result was measured on: the machine, the packages and the project commit.

``describe()`` is written into every ``results.json`` so a number can be traced to
the CPU that made it (float rounding differs between CPUs, so a run is exact only
on the machine that made it), the versions that matter and the code.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

# The packages whose versions change what a tiny-world run computes.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers",
            "datasets", "bm25s", "numpy")


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.lower().startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def usable_cores() -> int:
  """Cores this process may run on (``taskset`` narrows it), not the machine's."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 0


def commit() -> str:
  """The project's git commit, ``+dirty`` when the tree has changes; ``unknown``
  outside a git checkout."""
  root = Path(__file__).resolve().parent.parent
  try:
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                          capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return head + ("+dirty" if dirty else "")


def package_versions(names=PACKAGES) -> dict[str, str]:
  versions = {}
  for name in names:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = "not installed"
  return versions


def describe() -> dict:
  """``{"cpu", "cores", "machine_cores", "python", "platform", "packages", "commit",
  "xla_flags"}``."""
  return {"cpu": cpu_model(), "cores": usable_cores(), "machine_cores": os.cpu_count() or 0,
          "python": platform.python_version(), "platform": platform.platform(),
          "packages": package_versions(), "commit": commit(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


__all__ = ["PACKAGES", "cpu_model", "usable_cores", "commit", "package_versions", "describe"]
