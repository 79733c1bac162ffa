"""The main job's offline default.

Command:  python -m zsjax.main --config=configs/tiny_world.py --workdir=/tmp/zsjax_tiny
Hardware: 2-core CPU, no accelerator, nothing downloaded.

Status: the tiny-world pipeline (synthetic world, BM25 engine, simulator tuning,
RL, evaluation) is not built yet. Until it is, this config runs the `model_check`
job of configs/model_check.py on a small random Qwen2-style model.
Expected now (~30 s): a printed table with decode_vs_full_max_abs_logit_diff
below 1e-4, export_max_abs_diff 0 and ok True; WORKDIR/model_check.json and an
HF export in WORKDIR/hf_export/.
"""

import importlib.util
from pathlib import Path


def _sibling(name):
  spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  del arg
  return _sibling("model_check").get_config("qwen2")
