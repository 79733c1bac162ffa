"""Loading ``configs/<name>.py`` files the way ``config_flags`` does (tests only)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_config(name, arg=None):
  """``get_config(arg)`` of ``configs/<name>.py`` (or of a given path)."""
  path = Path(name) if str(name).endswith(".py") else ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
