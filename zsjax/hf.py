"""Local Hugging Face checkpoints <-> zsjax params, and local tokenizers.

Reads ``config.json`` plus one or many ``*.safetensors`` files (with or without
``model.safetensors.index.json``) tensor by tensor with the safetensors numpy
backend: no torch, no hub. Writes directories that
``transformers.AutoModelForCausalLM.from_pretrained`` loads.

One table (``_weight_rules``) names every HF tensor, the zsjax param it fills
and the layout change between them; loading, saving and shape checks all read
it, so the two directions cannot drift apart.

Layouts: HF linear weights are ``[out, in]``; zsjax kernels are ``[in, out]``
with heads split out (``q_proj``: ``[D, N, H]``, ``o_proj``: ``[N, H, D]``) and
a leading ``[Y]`` layer axis on everything inside ``layers``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from zsjax.model import ModelConfig, RopeScaling, init_params, param_shapes

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_HF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                     "llama": "LlamaForCausalLM"}
# Tensors some exporters write that carry no learned state.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be read into the expected params."""


# --------------------------------------------------------------------------- config


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
  """Rope theta and scaling from either the legacy keys or ``rope_parameters``."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  merged = {**scaling, **params}
  kind = merged.get("rope_type", merged.get("type", "default"))
  if kind == "default":
    return float(theta), None
  if kind == "linear":
    return float(theta), RopeScaling(kind="linear", factor=float(merged["factor"]))
  if kind == "llama3":
    return float(theta), RopeScaling(
        kind="llama3", factor=float(merged["factor"]),
        low_freq_factor=float(merged["low_freq_factor"]),
        high_freq_factor=float(merged["high_freq_factor"]),
        original_max_position_embeddings=int(merged["original_max_position_embeddings"]))
  raise CheckpointError(
      f"config.json: rope type {kind!r} is not supported (supported: default, linear, "
      "llama3). Remove 'rope_scaling' to run without scaling if the context fits.")


def _as_tuple(value) -> tuple[int, ...]:
  if value is None:
    return ()
  return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def config_from_hf(hf: Mapping[str, Any], dtype=jnp.float32, source: str = CONFIG_FILE) -> ModelConfig:
  """``ModelConfig`` from a parsed HF ``config.json`` of the Qwen2 or Llama family."""
  model_type = hf.get("model_type")
  if model_type not in _HF_ARCHITECTURES:
    raise CheckpointError(
        f"{source}: model_type={model_type!r} (architectures={hf.get('architectures')}) is not "
        f"supported; zsjax reads {sorted(_HF_ARCHITECTURES)} (Qwen2/Qwen2.5, Qwen3 dense, "
        "Llama 3.x).")
  if hf.get("use_sliding_window"):
    raise CheckpointError(f"{source}: use_sliding_window=true is not supported; set it to false "
                          "(Qwen2.5 checkpoints ship with it off).")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r}; only 'silu' is supported.")
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads") if k not in hf]
  if missing:
    raise CheckpointError(f"{source}: required field(s) {missing} are missing.")
  theta, scaling = _rope_from_hf(hf)
  num_heads = int(hf["num_attention_heads"])
  head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
  if model_type == "qwen2":
    qkv_bias, o_bias, mlp_bias = True, False, False
  elif model_type == "qwen3":  # attention_bias (off in released models) covers q, k, v and o
    qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    mlp_bias = False
  else:
    qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
  dtype = jnp.dtype(dtype).name
  return ModelConfig(
      arch=model_type, vocab_size=int(hf["vocab_size"]), embed_dim=int(hf["hidden_size"]),
      mlp_dim=int(hf["intermediate_size"]), num_layers=int(hf["num_hidden_layers"]),
      num_heads=num_heads, num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(head_dim), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=theta, rope_scaling=scaling, qkv_bias=qkv_bias, o_bias=o_bias,
      mlp_bias=mlp_bias, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
      bos_token_id=hf.get("bos_token_id"), eos_token_ids=_as_tuple(hf.get("eos_token_id")),
      pad_token_id=hf.get("pad_token_id"), dtype=dtype, param_dtype=dtype)


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
  """An HF ``config.json`` dict. Rope settings are written in both the legacy
  (``rope_theta``/``rope_scaling``) and the current (``rope_parameters``) form."""
  if cfg.arch == "qwen2" and (not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
    raise CheckpointError("Qwen2 checkpoints have q/k/v biases only: export needs qkv_bias=True, "
                          f"o_bias=False, mlp_bias=False (got {cfg.qkv_bias}, {cfg.o_bias}, "
                          f"{cfg.mlp_bias}); use arch='llama' for other bias layouts.")
  if cfg.arch in ("llama", "qwen3") and (cfg.qkv_bias != cfg.o_bias
                                          or (cfg.arch == "qwen3" and cfg.mlp_bias)):
    raise CheckpointError(f"{cfg.arch}'s attention_bias sets q/k/v and o biases together (and "
                          "Qwen3 has no MLP bias): export needs qkv_bias == o_bias (got "
                          f"{cfg.qkv_bias}, {cfg.o_bias}, mlp_bias={cfg.mlp_bias}).")
  scaling = None
  rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    scaling = {"rope_type": s.kind, "factor": s.factor}
    if s.kind == "llama3":
      scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                     original_max_position_embeddings=s.original_max_position_embeddings)
    rope_parameters = {**scaling, "rope_theta": cfg.rope_theta}
  eos = list(cfg.eos_token_ids)
  out = {
      "architectures": [_HF_ARCHITECTURES[cfg.arch]], "model_type": cfg.arch,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": rope_parameters,
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_position_embeddings,
      "bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
      "pad_token_id": cfg.pad_token_id, "torch_dtype": torch_dtype, "dtype": torch_dtype,
      "use_cache": True,
  }
  if cfg.arch == "llama":
    out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  elif cfg.arch == "qwen3":
    out.update(attention_bias=cfg.qkv_bias, use_sliding_window=False, sliding_window=None)
  else:
    out.update(use_sliding_window=False, sliding_window=None)
  return out


# --------------------------------------------------------------------- weight table


@dataclasses.dataclass(frozen=True)
class _Rule:
  """One HF tensor name (``{i}`` = layer) <-> one zsjax param path."""

  hf_name: str
  path: tuple[str, ...]
  to_jax: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  layered: bool = False


def _same(x):
  return x


def _transpose(x):
  return x.T


def _weight_rules(cfg: ModelConfig, head: str = "lm") -> list[_Rule]:
  d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def heads_in(heads):  # HF [heads*H, D] <-> [D, heads, H]
    return (lambda w: w.T.reshape(d, heads, h), lambda w: w.reshape(d, heads * h).T)

  def heads_bias(heads):  # HF [heads*H] <-> [heads, H]
    return (lambda b: b.reshape(heads, h), lambda b: b.reshape(heads * h))

  heads_out = (lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T)  # HF [D, N*H]
  pre = "model.layers.{i}."
  rules = [
      _Rule("model.embed_tokens.weight", ("embed", "embedding"), _same, _same),
      _Rule("model.norm.weight", ("final_norm", "scale"), _same, _same),
      _Rule(pre + "input_layernorm.weight", ("layers", "input_norm", "scale"), _same, _same, True),
      _Rule(pre + "post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale"),
            _same, _same, True),
  ]
  for proj, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
    rules.append(_Rule(pre + f"self_attn.{proj}.weight", ("layers", "attn", proj, "kernel"),
                       *heads_in(heads), True))
    if cfg.qkv_bias:
      rules.append(_Rule(pre + f"self_attn.{proj}.bias", ("layers", "attn", proj, "bias"),
                         *heads_bias(heads), True))
  rules.append(_Rule(pre + "self_attn.o_proj.weight", ("layers", "attn", "o_proj", "kernel"),
                     *heads_out, True))
  if cfg.qk_norm:
    for norm in ("q_norm", "k_norm"):
      rules.append(_Rule(pre + f"self_attn.{norm}.weight", ("layers", "attn", norm, "scale"),
                         _same, _same, True))
  if cfg.o_bias:
    rules.append(_Rule(pre + "self_attn.o_proj.bias", ("layers", "attn", "o_proj", "bias"),
                       _same, _same, True))
  for proj in ("gate_proj", "up_proj", "down_proj"):
    rules.append(_Rule(pre + f"mlp.{proj}.weight", ("layers", "mlp", proj, "kernel"),
                       _transpose, _transpose, True))
    if cfg.mlp_bias:
      rules.append(_Rule(pre + f"mlp.{proj}.bias", ("layers", "mlp", proj, "bias"),
                         _same, _same, True))
  if head == "lm" and not cfg.tie_embeddings:
    rules.append(_Rule("lm_head.weight", ("lm_head",), _transpose, _transpose))
  return rules


def _hf_shape(rule: _Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF shape of a (one-layer) param of ``shape``, computed without allocating."""
  return rule.to_hf(_ShapeProbe(shape)).shape


class _ShapeProbe:
  """Stands in for a large array: supports ``.T``, ``.reshape`` and ``.shape``."""

  def __init__(self, shape):
    self.shape = tuple(shape)

  @property
  def T(self):  # noqa: N802 (numpy's name)
    return _ShapeProbe(self.shape[::-1])

  def reshape(self, *shape):
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return _ShapeProbe(tuple(int(s) for s in shape))


# ------------------------------------------------------------------------- reading


def _tensor_files(directory: Path) -> dict[str, Path]:
  """Maps every tensor name in the checkpoint to the file that holds it."""
  index = directory / INDEX_FILE
  if index.exists():
    try:
      weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as e:
      raise CheckpointError(f"{index} is not a valid index ({type(e).__name__}: {e}); rewrite it "
                            "or remove it to read every *.safetensors file.") from None
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: has no 'weight_map' object.")
    files = {name: directory / fname for name, fname in weight_map.items()}
    for path in sorted(set(files.values())):
      if not path.exists():
        raise CheckpointError(f"{index} lists {path.name}, which does not exist in {directory}.")
    return files
  paths = sorted(directory.glob("*.safetensors"))
  if not paths:
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = (f" It has {others}: convert them to safetensors first "
            "(transformers: model.save_pretrained(dir, safe_serialization=True)).") if others else ""
    raise CheckpointError(f"{directory}: no *.safetensors files found.{hint}")
  files = {}
  for path in paths:
    with _open_safetensors(path) as f:
      for name in f.keys():
        files[name] = path
  return files


def _open_safetensors(path: Path):
  """``safe_open`` whose failure (a truncated or corrupt file) names the file."""
  try:
    return safe_open(path, framework="numpy")
  except Exception as e:  # safetensors' errors do not name the file
    raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
                          "it may be truncated (an interrupted copy or download): copy it "
                          "again.") from None


def read_config(path: str | os.PathLike, dtype=jnp.float32) -> ModelConfig:
  """The ``ModelConfig`` of a local HF checkpoint directory."""
  directory = Path(path)
  if not directory.is_dir():
    raise CheckpointError(f"Checkpoint directory {directory} does not exist (or is not a "
                          "directory); give a local HF model directory, not a hub name.")
  config_path = directory / CONFIG_FILE
  if not config_path.exists():
    raise CheckpointError(f"{config_path} is missing: an HF checkpoint directory needs "
                          "config.json beside its *.safetensors files.")
  try:
    hf = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
  cfg = config_from_hf(hf, dtype, source=str(config_path))
  return dataclasses.replace(cfg, eos_token_ids=end_token_ids(directory, cfg.eos_token_ids))


def end_token_ids(directory: Path, from_config: tuple[int, ...] = ()) -> tuple[int, ...]:
  """Every end token of a checkpoint, as transformers stops on them:
  ``generation_config.json``'s ``eos_token_id`` (an id or a list; Qwen2.5 instruct
  lists two), then any other of ``config.json``'s. A tokenizer's single
  ``eos_token`` is not enough."""
  path = directory / "generation_config.json"
  ids: tuple[int, ...] = ()
  if path.exists():
    try:
      ids = _as_tuple(json.loads(path.read_text()).get("eos_token_id"))
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path} is not valid JSON: {e}") from None
  return tuple(dict.fromkeys(ids + tuple(from_config)))


def end_tokens(cfg: ModelConfig, tokenizer) -> tuple[int, ...]:
  """The tokens a model stops on, wherever it generates (RL, evaluation,
  simulator tuning, the simulator): its checkpoint's (``generation_config.json``,
  then ``config.json``: ``cfg.eos_token_ids`` as ``load_checkpoint`` reads them),
  else the tokenizer's end token. An instruct checkpoint lists two (Qwen2.5:
  ``<|im_end|>`` and ``<|endoftext|>``), its tokenizer names one."""
  if cfg.eos_token_ids:
    return tuple(cfg.eos_token_ids)
  return tuple(i for i in (tokenizer.eos_token_id,) if i is not None)


def iter_checkpoint_params(path: str | os.PathLike, cfg: ModelConfig, head: str = "lm",
                           dtype=jnp.float32) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """Yields ``(param_path, host_array)`` in zsjax layout, one param at a time (a
  layered param is stacked from its per-layer HF tensors), reading one HF tensor at
  a time. Checks first that the checkpoint holds no tensor the model would not use,
  then that each tensor is present with the expected shape."""
  directory = Path(path)
  files = _tensor_files(directory)
  shapes = param_shapes(cfg, head)
  np_dtype = np.dtype(jnp.dtype(dtype))
  rules = _weight_rules(cfg, head)
  expected_names = {rule.hf_name.format(i=layer) for rule in rules
                    for layer in (range(cfg.num_layers) if rule.layered else [None])}
  unexpected = sorted(n for n in files if n not in expected_names
                      and not n.endswith(_IGNORABLE_SUFFIXES)
                      and not (n == "lm_head.weight" and (cfg.tie_embeddings or head != "lm")))
  if unexpected:
    raise CheckpointError(
        f"{directory}: tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} are not "
        f"used by the {cfg.arch} model of config.json ({cfg.num_layers} layers, qkv_bias="
        f"{cfg.qkv_bias}, mlp_bias={cfg.mlp_bias}, tie_embeddings={cfg.tie_embeddings}); the "
        "checkpoint and its config.json do not match.")

  open_files: dict[Path, Any] = {}

  def read(name: str, want: tuple[int, ...]) -> np.ndarray:
    if name not in files:
      raise CheckpointError(
          f"{directory}: tensor {name!r} (expected shape {list(want)}) is missing from the "
          f"checkpoint files {sorted({p.name for p in files.values()})}.")
    file = files[name]
    if file not in open_files:
      open_files[file] = _open_safetensors(file).__enter__()
    found = tuple(open_files[file].get_slice(name).get_shape())
    if found != tuple(want):
      raise CheckpointError(
          f"{file}: tensor {name!r} has shape {list(found)}, expected {list(want)} for the "
          f"config in {directory / CONFIG_FILE}; the checkpoint and its config do not match.")
    try:
      tensor = open_files[file].get_tensor(name)
    except Exception as e:
      raise CheckpointError(f"{file}: tensor {name!r} cannot be read ({type(e).__name__}: "
                            f"{e}); the file may be truncated: copy it again.") from None
    floating = tensor.dtype.kind == "f" or tensor.dtype.name in ("bfloat16", "float8_e4m3fn",
                                                                   "float8_e5m2")
    if floating and not np.isfinite(tensor).all():
      bad = int(np.size(tensor) - np.isfinite(tensor).sum())
      raise CheckpointError(f"{file}: tensor {name!r} holds {bad} non-finite value(s) (NaN or "
                            "inf); the checkpoint is corrupt or was saved from a diverged run.")
    return tensor

  try:
    for rule in rules:
      shape = _get(shapes, rule.path).shape
      if not rule.layered:
        yield rule.path, rule.to_jax(read(rule.hf_name, _hf_shape(rule, shape))).astype(np_dtype)
        continue
      stacked = np.empty(shape, np_dtype)
      for layer in range(cfg.num_layers):
        tensor = read(rule.hf_name.format(i=layer), _hf_shape(rule, shape[1:]))
        stacked[layer] = rule.to_jax(tensor)
      yield rule.path, stacked
  finally:
    for handle in open_files.values():
      handle.__exit__(None, None, None)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _place(array: np.ndarray, sharding) -> jax.Array:
  """Puts a host array on device; with a sharding, each device receives only its
  own slice (no full copy on any one device; works across processes)."""
  if sharding is None:
    return jnp.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def load_checkpoint(path: str | os.PathLike, dtype=jnp.float32, *, head: str = "lm",
                    plan=None) -> tuple[ModelConfig, Any]:
  """Reads a local HF directory into ``(ModelConfig, params)``.

  ``dtype`` is both the param and the compute dtype of the returned config
  (change the latter with ``dataclasses.replace(cfg, dtype=...)``). With
  ``head="value"`` the LM head is skipped and a zero value head added (a PPO
  critic initialised from a policy checkpoint). With ``plan`` (a
  ``zsjax.sharding.ShardingPlan``) every param is placed straight onto its shards
  as it is read; host memory holds one param at a time either way.
  """
  cfg = read_config(path, dtype)
  shardings = plan.params(cfg, head) if plan is not None else None
  params: dict = {}
  for param_path, array in iter_checkpoint_params(path, cfg, head, dtype):
    _set(params, param_path, _place(array, shardings and _get(shardings, param_path)))
    del array
  if head == "value":
    shape = param_shapes(cfg, head)["value_head"].shape
    _set(params, ("value_head",), _place(np.zeros(shape, np.dtype(jnp.dtype(dtype))),
                                         shardings and shardings["value_head"]))
  return cfg, params


# ------------------------------------------------------------------------- writing


def hf_state_dict(cfg: ModelConfig, params, dtype=None) -> dict[str, np.ndarray]:
  """The HF-named numpy tensors of ``params`` (one host copy, gathered from every
  device and process; call it on all processes when params span several)."""
  tensors = {}
  for rule in _weight_rules(cfg):
    value = _get(params, rule.path)
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
      from jax.experimental import multihost_utils  # params spread over several processes
      value = multihost_utils.process_allgather(value, tiled=True)
    value = np.asarray(jax.device_get(value))
    if dtype is not None:
      value = value.astype(np.dtype(jnp.dtype(dtype)))
    for layer in (range(cfg.num_layers) if rule.layered else [None]):
      piece = value if layer is None else value[layer]
      tensors[rule.hf_name.format(i=layer)] = np.ascontiguousarray(rule.to_hf(piece))
  return tensors


def save_checkpoint(path: str | os.PathLike, cfg: ModelConfig, params, *, dtype=None,
                    max_shard_bytes: int = 2 << 30) -> Path:
  """Writes ``config.json`` and safetensors (sharded with an index above
  ``max_shard_bytes``) that transformers' ``from_pretrained`` loads."""
  directory = Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = hf_state_dict(cfg, params, dtype)
  dtype_name = np.dtype(next(iter(tensors.values())).dtype).name
  (directory / CONFIG_FILE).write_text(json.dumps(config_to_hf(cfg, dtype_name), indent=2) + "\n")
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, tensor in tensors.items():
    if shards[-1] and size + tensor.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensor
    size += tensor.nbytes
  for stale in directory.glob("*.safetensors"):
    stale.unlink()
  (directory / INDEX_FILE).unlink(missing_ok=True)
  metadata = {"format": "pt"}  # transformers expects this marker
  if len(shards) == 1:
    _save_tensors(shards[0], directory / SINGLE_FILE, metadata)
    return directory
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    _save_tensors(shard, directory / fname, metadata)
    weight_map.update({name: fname for name in shard})
  total = sum(t.nbytes for t in tensors.values())
  (directory / INDEX_FILE).write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
  return directory


def _save_tensors(tensors: dict, path: Path, metadata: dict) -> None:
  """``save_file``, then the mode any other file written here gets (safetensors
  creates its files 0600: a shared checkpoint then is unreadable by others)."""
  save_file(tensors, str(path), metadata=metadata)
  os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
  """The process's umask, read without setting it (``os.umask`` would, for a
  moment, for every thread)."""
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  except OSError:
    pass
  return 0o022


# ----------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | os.PathLike, **kwargs):
  """A tokenizer from a local directory (never the hub)."""
  from transformers import AutoTokenizer  # heavy import, only where tokenizers are used

  directory = Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"Tokenizer directory {directory} does not exist; give a local "
                            "directory holding tokenizer.json / tokenizer_config.json.")
  return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, **kwargs)


def config_tokenizer(config, section: str):
  """The tokenizer a job's config names: ``config.tokenizer``, else the one beside
  ``config.<section>.checkpoint`` (both empty: an error naming both)."""
  path = config.tokenizer or config[section].checkpoint
  if not path:
    raise ValueError(f"config.tokenizer is empty and config.{section}.checkpoint too; give a "
                     "local directory with the tokenizer.")
  return load_tokenizer(path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def partner_tokenizer(checkpoint: str, tokenizer, tokenizer_path: str, *, what: str):
  """The tokenizer of the model at ``checkpoint`` (``config.<what>.checkpoint``),
  which exchanges token ids with the model of ``tokenizer`` (at ``tokenizer_path``):
  its own when the directory holds one (its chat template, its end token), else
  ``tokenizer``. Raises ``ValueError`` naming both paths when the two vocabularies
  give any id the other also has a different token: the simulator reads the
  policy's query ids and writes ids into the policy's context."""
  if not checkpoint or not any((Path(checkpoint) / f).exists() for f in TOKENIZER_FILES):
    return tokenizer
  own = load_tokenizer(checkpoint)
  ours, theirs = tokenizer.get_vocab(), own.get_vocab()
  by_id = {i: t for t, i in theirs.items()}
  differ = [(i, t, by_id[i]) for t, i in sorted(ours.items(), key=lambda kv: kv[1])
            if i in by_id and by_id[i] != t]
  missing = [t for t in ours if t not in theirs][:3]
  if differ or missing:
    example = (f"id {differ[0][0]} is {differ[0][1]!r} for one and {differ[0][2]!r} for the other"
               if differ else f"{missing} are not in the {what}'s vocabulary")
    raise ValueError(
        f"the {what} at {checkpoint} and the policy's tokenizer at {tokenizer_path} do not share "
        f"their token ids ({len(differ)} ids differ; {example}); they exchange ids, so use a "
        f"{what} of the policy's model family (Qwen2.5 with Qwen2.5) or the same tokenizer.")
  return own


def load_model(section, plan, rng: jax.Array, vocab_size: int, eos_ids, *, what: str):
  """``(cfg, params)`` of a config section (``checkpoint``, ``param_dtype``,
  ``dtype``, ``remat``, ``model``, optional ``logits_chunk`` and ``attention_impl``): the local HF directory ``section.checkpoint``
  or, when it is empty, a random model of shape ``section.model`` (its vocab 0 =
  the tokenizer's ``vocab_size``, its empty ``eos_token_ids`` = ``eos_ids``),
  placed by ``plan`` (a ``zsjax.sharding.ShardingPlan``, or None). ``what`` names
  the section in errors."""

  if section.checkpoint:
    cfg, params = load_checkpoint(section.checkpoint, dtype=section.param_dtype, plan=plan)
    # Compute dtype, remat, the logits chunk and the attention kernel are run settings,
    # not part of the checkpoint.
    cfg = dataclasses.replace(cfg, dtype=section.dtype, remat=section.remat,
                              logits_chunk=section.get("logits_chunk", 0),
                              attention_impl=section.attention_impl)
  else:
    fields = section.model.to_dict()
    if not fields:
      raise ValueError(f"config.{what}.checkpoint is empty and config.{what}.model has no "
                       f"fields; give a local HF directory (--config.{what}.checkpoint=...).")
    if not fields.get("vocab_size"):
      fields["vocab_size"] = vocab_size
    if not fields.get("eos_token_ids"):
      fields["eos_token_ids"] = tuple(eos_ids)
    cfg = ModelConfig.from_dict(fields)
    cfg = dataclasses.replace(cfg, logits_chunk=section.get("logits_chunk", 0),
                              attention_impl=section.attention_impl)
    params = jax.jit(init_params, static_argnums=0, out_shardings=plan.params(cfg))(cfg, rng)
  if cfg.vocab_size < vocab_size:
    raise ValueError(f"{what}: the model's vocab_size={cfg.vocab_size} is smaller than the "
                     f"tokenizer's {vocab_size} tokens; use the tokenizer the model was trained "
                     "with (config.tokenizer).")
  return cfg, params


__all__ = ["CheckpointError", "load_model", "end_tokens", "partner_tokenizer", "TOKENIZER_FILES",
           "config_from_hf", "config_to_hf", "read_config",
           "iter_checkpoint_params", "load_checkpoint", "save_checkpoint", "hf_state_dict",
           "load_tokenizer", "config_tokenizer"]
