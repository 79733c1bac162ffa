"""Decoder-only transformer for the Qwen2 / Qwen2.5 and Llama-3.x families.

One pure Flax Linen module serves the policy, the frozen reference, the PPO critic
(``head="value"``) and the search simulator: they differ only in their params.

Shape legend (used in comments and einsum strings):
  B batch, L tokens in this call, S cache slots, D model width, N query heads,
  K kv heads, G = N // K query heads per kv head, H head dim, F MLP width,
  V vocab, Y layers.

Params carry logical axis names (``vocab``, ``embed``, ``mlp``, ``heads``,
``kv_heads``, ``head_dim``, ``norm``, ``layers``, ``value``); activations are
pinned with logical names too (``batch``, ``length``, ``act_embed``, ...), which
take effect only inside ``activation_sharding`` (entered by
``zsjax.sharding.ShardingPlan.context()``).
``zsjax.sharding`` maps the names onto a mesh; no code in this file mentions one.

Attention masks
---------------
Without a cache, a token at index i of row b attends to index j <= i of the same
row when ``segment_ids[b, i] == segment_ids[b, j] != 0``. A 0/1 padding mask is a
valid ``segment_ids`` (left or right padding); distinct ids pack several
sequences into one row. ``positions`` (the rotary positions) default to
``arange(L)``; pass ``cumsum(mask) - 1`` for left padding, or restart them per
packed segment.

KV cache layout
---------------
``KVCache(k, v, lengths)`` with ``k``, ``v``: ``[Y, B, S, K, H]`` and
``lengths``: ``[B]`` int32. Row b holds its tokens contiguously in slots
``[0, lengths[b])``; slot index equals the token's position in the row. A call
with a cache writes its L tokens at slots ``lengths[b] + arange(L)`` (writes
past S are dropped, never clamped onto live slots), the token at chunk index i
attends to the filled slots ``< lengths[b]`` and to chunk tokens ``<= i``,
and ``lengths`` advances by the number of real tokens (``segment_ids != 0``, a
right-padded chunk) or by L. Slots past ``lengths`` may hold stale values: they are never attended and the next write
overwrites them. Prefill (L > 1, any per-row offsets) and decode (L == 1) are the
same call.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -1e30  # finite, so a fully masked row gives a uniform softmax, not NaN
_ARCHS = ("qwen2", "qwen3", "llama")
_REMAT = ("none", "full", "dots")
_HEADS = ("lm", "value", "hidden")
# How attention without a cache (training, scoring, a prefill into an empty cache) is
# computed. "einsum": zsjax's own einsums (the only path with a cache: decode and later
# prefills). "xla": jax.nn.dot_product_attention's XLA path. "cudnn": its fused cuDNN
# kernel (flash attention; an NVIDIA GPU, bfloat16 or float16, head_dim <= 128, a
# multiple of 8). "auto": cudnn where those hold, einsum elsewhere (attention_implementation).
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")
_CUDNN_DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary frequency scaling. ``kind``: ``"linear"`` or ``"llama3"``."""

  kind: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ("linear", "llama3"):
      raise ValueError(
          f"RopeScaling.kind={self.kind!r} is not supported; use 'linear' or "
          "'llama3', or None for unscaled rotary embeddings.")
    if self.factor <= 0:
      raise ValueError(f"RopeScaling.factor={self.factor} must be > 0.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of one decoder. Frozen and hashable (jit-static)."""

  vocab_size: int
  embed_dim: int  # D
  mlp_dim: int  # F
  num_layers: int  # Y
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  arch: str = "llama"  # HF model_type: "qwen2", "qwen3" or "llama"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False  # Qwen2: True
  o_bias: bool = False  # Llama attention_bias sets both qkv_bias and o_bias
  mlp_bias: bool = False
  tie_embeddings: bool = False
  max_position_embeddings: int = 4096
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  dtype: str = "float32"  # activations / matmuls
  param_dtype: str = "float32"
  remat: str = "none"  # "none" | "full" | "dots" (save matmul outputs)
  # run setting: token_log_probs computes the LM head's float32 logits this many
  # positions at a time, each piece recomputed in the backward pass, so no [B, L, V]
  # array exists (0 = the whole sequence at once). Results are the same.
  logits_chunk: int = 0
  # run setting: how attention without a cache is computed (ATTENTION_IMPLS); the same
  # function, other kernels (float rounding may differ)
  attention_impl: str = "auto"

  def __post_init__(self):
    positive = ("vocab_size", "embed_dim", "mlp_dim", "num_layers", "num_heads",
                "num_kv_heads", "head_dim")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"ModelConfig.{name}={value!r} must be a positive integer.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}; grouped-query attention needs "
          "num_heads = G * num_kv_heads.")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings.")
    if self.arch not in _ARCHS:
      raise ValueError(f"ModelConfig.arch={self.arch!r} is not one of {_ARCHS}.")
    if self.remat not in _REMAT:
      raise ValueError(f"ModelConfig.remat={self.remat!r} is not one of {_REMAT}.")
    if not isinstance(self.logits_chunk, (int, np.integer)) or self.logits_chunk < 0:
      raise ValueError(f"ModelConfig.logits_chunk={self.logits_chunk!r} must be an integer >= 0 "
                       "(positions per piece of the LM head; 0 = the whole sequence). Set it "
                       "with config.policy.logits_chunk (config.model.logits_chunk for SFT).")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r} is not one of "
                       f"{ATTENTION_IMPLS}; 'auto' picks cuDNN's fused kernel on a GPU and "
                       "zsjax's einsums elsewhere (config.policy.attention_impl, "
                       "config.simulator.attention_impl, config.model.attention_impl).")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      try:
        jnp.dtype(value)
      except TypeError:
        raise ValueError(f"ModelConfig.{name}={value!r} is not a dtype name "
                         "(use 'float32' or 'bfloat16').") from None
      object.__setattr__(self, name, jnp.dtype(value).name)
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from a mapping (e.g. a ``ConfigDict``), naming unknown keys."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"Unknown model config field(s) {unknown}; known fields: {sorted(known)}.")
    values = dict(values)
    if values.get("rope_scaling") is not None and not isinstance(values["rope_scaling"], RopeScaling):
      values["rope_scaling"] = RopeScaling(**dict(values["rope_scaling"]))
    if "eos_token_ids" in values:
      values["eos_token_ids"] = tuple(values["eos_token_ids"])
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def qk_norm(self) -> bool:
    """Qwen3: an RMSNorm over each head's queries and keys, before the rotary."""
    return self.arch == "qwen3"

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def groups(self) -> int:  # G
    return self.num_heads // self.num_kv_heads


@flax.struct.dataclass
class KVCache:
  """Per-layer keys and values of every row; layout in the module docstring."""

  k: jax.Array  # [Y, B, S, K, H]
  v: jax.Array  # [Y, B, S, K, H]
  lengths: jax.Array  # [B] int32, filled slots per row

  @property
  def max_length(self) -> int:  # S
    return self.k.shape[2]


def init_cache(cfg: ModelConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
  """An empty cache of ``max_length`` slots per row (``dtype`` defaults to cfg.dtype)."""
  dtype = cfg.compute_dtype if dtype is None else dtype
  shape = (cfg.num_layers, batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 lengths=jnp.zeros((batch_size,), jnp.int32))


def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Rotary inverse frequencies ``[H / 2]`` (float32), scaled as configured."""
  exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
  inv_freq = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponents)).astype(np.float32)
  scaling = cfg.rope_scaling
  if scaling is None:
    return inv_freq
  if scaling.kind == "linear":
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
  # Llama 3: long wavelengths are slowed by `factor`, short ones kept, and the
  # band between interpolated smoothly.
  old_len = np.float32(scaling.original_max_position_embeddings)
  low_wavelen = old_len / np.float32(scaling.low_freq_factor)
  high_wavelen = old_len / np.float32(scaling.high_freq_factor)
  wavelen = np.float32(2 * np.pi) / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(scaling.factor), inv_freq)
  smooth = (old_len / wavelen - np.float32(scaling.low_freq_factor)) / (
      np.float32(scaling.high_freq_factor) - np.float32(scaling.low_freq_factor))
  smoothed = (1 - smooth) * scaled / np.float32(scaling.factor) + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin ``[B, L, H / 2]`` (float32) for integer ``positions [B, L]``."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(cfg))
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x [B, L, heads, H]`` by half-split pairs (the HF convention), in float32."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


# Maps a tuple of logical names to a sharding while a ShardingPlan is active
# (``zsjax.sharding.ShardingPlan.context``); None otherwise. The model sees only
# this opaque function, never a mesh.
_ACTIVATION_SHARDING: contextvars.ContextVar = contextvars.ContextVar(
    "zsjax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(names_to_sharding):
  """Makes ``constrain`` pin activations with ``names_to_sharding(names)``."""
  token = _ACTIVATION_SHARDING.set(names_to_sharding)
  try:
    yield
  finally:
    _ACTIVATION_SHARDING.reset(token)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Pins an activation's layout by logical names; a no-op outside
  ``activation_sharding``. Keeps XLA from, e.g., replicating the batch to match
  FSDP-sharded weights instead of gathering the weights."""
  to_sharding = _ACTIVATION_SHARDING.get()
  return x if to_sharding is None else jax.lax.with_sharding_constraint(x, to_sharding(names))


def _param_init(names: tuple[str, ...], init=nn.initializers.normal(stddev=0.02)):
  return nn.with_logical_partitioning(init, names)


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):  # [B, L, D]
    scale = self.param("scale", _param_init(("norm",), nn.initializers.ones),
                       (x.shape[-1],), self.cfg.params_dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
    return scale.astype(self.cfg.compute_dtype) * xf.astype(self.cfg.compute_dtype)


def _dense(cfg: ModelConfig, features, axis, names, bias_names, use_bias, name):
  return nn.DenseGeneral(
      features=features, axis=axis, use_bias=use_bias, dtype=cfg.compute_dtype,
      param_dtype=cfg.params_dtype, kernel_init=_param_init(names),
      bias_init=_param_init(bias_names, nn.initializers.zeros), name=name)


def gpu_capability() -> str | None:
  """The first device's CUDA compute capability ("9.0"), or None off an NVIDIA GPU."""
  return getattr(jax.devices()[0], "compute_capability", None)


def attention_implementation(cfg: ModelConfig, backend: str, length: int | None = None,
                             capability: str | None = None) -> str:
  """The kernel ``cfg.attention_impl`` names on ``backend`` (``jax.default_backend()``)
  for a call of ``length`` tokens: "auto" is "cudnn" on an NVIDIA GPU of compute
  capability >= 8.0 (``capability``; cuDNN's fused attention needs Ampere or newer)
  when the compute dtype is bfloat16/float16, the head dim suits cuDNN (<= 128, a
  multiple of 8) and the length is even (cuDNN's masked backward needs it), else
  "einsum". An explicit "cudnn" where cuDNN cannot run is an error naming the
  field, not a silent fallback."""
  try:
    ampere = capability is not None and float(capability) >= 8.0
  except ValueError:
    ampere = False
  fits = (backend in ("gpu", "cuda") and ampere and cfg.dtype in _CUDNN_DTYPES
          and cfg.head_dim <= 128 and cfg.head_dim % 8 == 0
          and (length is None or length % 2 == 0))
  if cfg.attention_impl == "auto":
    return "cudnn" if fits else "einsum"
  if cfg.attention_impl == "cudnn" and not fits:
    raise ValueError(
        f"attention_impl='cudnn' needs an NVIDIA GPU of compute capability >= 8.0 (backend: "
        f"{backend!r}, capability: {capability!r}), a bfloat16 or float16 compute dtype "
        f"(dtype: {cfg.dtype!r}), head_dim <= 128, a multiple of 8 (head_dim: "
        f"{cfg.head_dim}) and an even length (length: {length}); set attention_impl='auto' "
        "(config.policy.attention_impl, config.simulator.attention_impl or "
        "config.model.attention_impl) to use it only where it runs.")
  return cfg.attention_impl


class Attention(nn.Module):
  """Grouped-query attention with rotary positions and an optional cache slice."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache_k, cache_v, lengths):
    cfg = self.cfg
    b, l, _ = x.shape
    n, k, g, h = cfg.num_heads, cfg.num_kv_heads, cfg.groups, cfg.head_dim
    q = _dense(cfg, (n, h), -1, ("embed", "heads", "head_dim"), ("heads", "head_dim"),
               cfg.qkv_bias, "q_proj")(x)  # [B, L, N, H]
    key = _dense(cfg, (k, h), -1, ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"),
                 cfg.qkv_bias, "k_proj")(x)  # [B, L, K, H]
    value = _dense(cfg, (k, h), -1, ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"),
                   cfg.qkv_bias, "v_proj")(x)  # [B, L, K, H]
    if cfg.qk_norm:
      q = RMSNorm(cfg, name="q_norm")(q)  # over H, one scale shared by the heads
      key = RMSNorm(cfg, name="k_norm")(key)
    q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    key = constrain(key, ("batch", "length", "kv_heads", "head_dim"))
    value = constrain(value, ("batch", "length", "kv_heads", "head_dim"))

    # Query groups ahead of the length axis, so the einsums are plain batched
    # matmuls over (B, K, G): on XLA:CPU the attention forward is ~1.7x and its
    # backward ~1.3x faster than with q as [B, L, K, G, H]. Keys and values (and so
    # the cache) keep their layout.
    backend = jax.default_backend()
    impl = attention_implementation(cfg, backend, l,
                                    gpu_capability() if backend in ("gpu", "cuda") else None)
    if impl != "einsum" and (cache_k is None or cache_k.shape[1] == 0):
      out = jax.nn.dot_product_attention(
          q, key, value, mask=mask[:, None], implementation=impl)  # [B, L, N, H]
      out = _dense(cfg, cfg.embed_dim, (-2, -1), ("heads", "head_dim", "embed"), ("embed",),
                   cfg.o_bias, "o_proj")(out.astype(cfg.compute_dtype))  # [B, L, D]
      return out, key, value
    q = q.reshape(b, l, k, g, h).transpose(0, 2, 3, 1, 4) * (h ** -0.5)  # [B, K, G, L, H]
    logits = jnp.einsum("bkglh,bskh->bkgls", q, key, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None, :, :], logits, _NEG_INF)  # [B, K, G, L, L]
    if cache_k is None or cache_k.shape[1] == 0:  # no cache, or a view of no slots
      probs = jax.nn.softmax(logits, axis=-1).astype(cfg.compute_dtype)
      out = jnp.einsum("bkgls,bskh->bkglh", probs, value)  # [B, K, G, L, H]
    else:
      # Two blocks: the cache's filled slots (read only, never copied) and this
      # chunk's own keys, merged by one softmax with a shared maximum. The caller
      # writes the chunk's keys/values into the cache once, for all layers.
      old = jnp.einsum("bkglh,bskh->bkgls", q, cache_k.astype(cfg.compute_dtype),
                       preferred_element_type=jnp.float32)
      filled = jnp.arange(cache_k.shape[1])[None, :] < lengths[:, None]  # [B, S]
      old = jnp.where(filled[:, None, None, None, :], old, _NEG_INF)  # [B, K, G, L, S]
      top = jnp.maximum(old.max(-1, keepdims=True), logits.max(-1, keepdims=True))
      p_old, p_new = jnp.exp(old - top), jnp.exp(logits - top)
      total = p_old.sum(-1, keepdims=True) + p_new.sum(-1, keepdims=True)
      out = (jnp.einsum("bkgls,bskh->bkglh", (p_old / total).astype(cfg.compute_dtype),
                        cache_v.astype(cfg.compute_dtype))
             + jnp.einsum("bkgls,bskh->bkglh", (p_new / total).astype(cfg.compute_dtype), value))
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, l, n, h)
    out = _dense(cfg, cfg.embed_dim, (-2, -1), ("heads", "head_dim", "embed"), ("embed",),
                 cfg.o_bias, "o_proj")(out)  # [B, L, D]
    return out, key, value  # the chunk's keys/values [B, L, K, H], for the cache


class _ProjectionWeights(nn.Module):
  """The kernel (and bias) of a projection, returned rather than applied."""

  cfg: ModelConfig
  shape: tuple[int, ...]
  names: tuple[str, ...]
  use_bias: bool

  @nn.compact
  def __call__(self):
    kernel = self.param("kernel", _param_init(self.names), self.shape, self.cfg.params_dtype)
    bias = (self.param("bias", _param_init(self.names[-1:], nn.initializers.zeros),
                       self.shape[-1:], self.cfg.params_dtype) if self.use_bias else None)
    return kernel, bias


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):  # [B, L, D]
    cfg = self.cfg
    shape, names = (cfg.embed_dim, cfg.mlp_dim), ("embed", "mlp")
    w_gate, b_gate = _ProjectionWeights(cfg, shape, names, cfg.mlp_bias, name="gate_proj")()
    w_up, b_up = _ProjectionWeights(cfg, shape, names, cfg.mlp_bias, name="up_proj")()
    # Gate and up as one [D, 2, F] matmul: same params and FLOPs, one larger GEMM
    # each way (the MLP backward is ~20% faster on XLA:CPU than with two).
    kernel = jnp.stack([w_gate, w_up], axis=1).astype(cfg.compute_dtype)  # [D, 2, F]
    gate_up = jnp.einsum("bld,dcf->blcf", x, kernel)  # [B, L, 2, F]
    if cfg.mlp_bias:
      gate_up = gate_up + jnp.stack([b_gate, b_up]).astype(cfg.compute_dtype)
    hidden = nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
    hidden = constrain(hidden, ("batch", "length", "mlp"))  # [B, L, F]
    return _dense(cfg, cfg.embed_dim, -1, ("mlp", "embed"), ("embed",), cfg.mlp_bias,
                  "down_proj")(hidden)  # [B, L, D]


class DecoderBlock(nn.Module):
  """Pre-norm attention + SwiGLU block; the body of the layer scan."""

  cfg: ModelConfig
  attend: int | None = None  # cache slots attention reads (None: all)

  @nn.compact
  def __call__(self, x, layer_cache, cos, sin, mask, lengths):
    cache_k, cache_v = layer_cache if layer_cache is not None else (None, None)
    if cache_k is not None and self.attend is not None:
      # sliced after the scan's per-layer slice, so XLA reads one [B, attend] block
      cache_k, cache_v = cache_k[:, :self.attend], cache_v[:, :self.attend]
    attn, new_k, new_v = Attention(self.cfg, name="attn")(
        RMSNorm(self.cfg, name="input_norm")(x), cos, sin, mask, cache_k, cache_v, lengths)
    x = x + attn
    x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attn_norm")(x))
    x = constrain(x, ("batch", "length", "act_embed"))
    # With a cache, hand this chunk's keys/values [B, L, K, H] out of the scan; the
    # cache itself is only read inside it.
    return x, ((new_k, new_v) if layer_cache is not None else None)


def _remat_policy(name: str):
  return {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """Causal, same-segment, non-padding mask ``[B, L, L]`` from ``segment_ids [B, L]``."""
  l = segment_ids.shape[1]
  causal = jnp.arange(l)[:, None] >= jnp.arange(l)[None, :]  # [L, L]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return causal[None] & same & (segment_ids[:, None, :] != 0)


class Transformer(nn.Module):
  """The decoder. ``head``: ``"lm"`` logits ``[B, L, V]`` (float32), ``"value"``
  scalar values ``[B, L]`` (float32, the PPO critic), ``"hidden"`` final hidden
  states ``[B, L, D]``.

  ``apply({"params": p}, tokens)`` returns the head's output; with
  ``cache=KVCache`` it returns ``(output, new_cache)``. ``tokens [B, L]`` int32;
  ``positions [B, L]`` int32; ``segment_ids [B, L]`` int32 (0 = padding);
  ``embeddings [B, L, D]`` replaces the token lookup when given.
  """

  cfg: ModelConfig
  head: str = "lm"

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
               embeddings=None, attend: int | None = None, write_cache: bool = True,
               logits_at=None):
    """``attend`` (static): with a cache, attention reads only its first ``attend``
    slots, which must hold every row's filled ones (``cached_apply`` picks it); the
    default reads all of them. ``write_cache=False``: return ``(output, (chunk_k,
    chunk_v, advance))`` for ``write_chunk`` instead of the updated cache.
    ``logits_at [B]`` int32: the head reads only that position of each row (output
    ``[B, 1, ...]``): a prefill that needs the last position's logits computes no
    ``[B, L, V]`` array."""
    cfg = self.cfg
    if self.head not in _HEADS:
      raise ValueError(f"Transformer.head={self.head!r} is not one of {_HEADS}.")
    b, l = tokens.shape if embeddings is None else embeddings.shape[:2]  # [B, L]
    if cache is not None:
      if positions is None:
        positions = cache.lengths[:, None] + jnp.arange(l, dtype=jnp.int32)
      mask = attention_mask(jnp.ones((b, l), jnp.int32))  # within the chunk [B, L, L]
    else:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
      if segment_ids is None:
        segment_ids = jnp.ones((b, l), jnp.int32)
      mask = attention_mask(segment_ids)  # [B, L, L]

    embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=cfg.compute_dtype,
                     param_dtype=cfg.params_dtype,
                     embedding_init=_param_init(("vocab", "embed")), name="embed")
    # `embeddings [B, L, D]` replaces the token lookup (soft prompts, gradient probes).
    x = embed(tokens) if embeddings is None else embeddings.astype(cfg.compute_dtype)  # [B, L, D]
    x = constrain(x, ("batch", "length", "act_embed"))
    cos, sin = rope_tables(cfg, positions)  # [B, L, H/2]

    block = DecoderBlock
    if cfg.remat != "none":
      block = nn.remat(block, prevent_cse=False, policy=_remat_policy(cfg.remat))
    layers = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(cfg, attend=attend if cache is not None else None, name="layers")
    layer_cache = (cache.k, cache.v) if cache is not None else None
    # each layer reads its first `attend` slots (DecoderBlock.attend)
    if cache is not None and attend is not None and not 0 <= attend <= cache.max_length:
      raise ValueError(f"attend={attend} must lie in [0, {cache.max_length}] (cache slots).")
    lengths = cache.lengths if cache is not None else None
    if lengths is not None:
      # A fresh cache has constant lengths; without the barrier XLA constant-folds the
      # whole masked [B, K, G, L, S] score block of a prefill at compile time (seconds).
      lengths = jax.lax.optimization_barrier(lengths)
    x, new_layer_cache = layers(x, layer_cache, cos, sin, mask, lengths)
    x = RMSNorm(cfg, name="final_norm")(x)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)  # [B,1,D]

    if self.head == "lm":
      if cfg.tie_embeddings:
        table = embed.embedding  # [V, D]
        out = jnp.einsum("bld,vd->blv", x, table.astype(cfg.compute_dtype),
                         preferred_element_type=jnp.float32)
      else:
        kernel = self.param("lm_head", _param_init(("embed", "vocab")),
                            (cfg.embed_dim, cfg.vocab_size), cfg.params_dtype)
        out = jnp.einsum("bld,dv->blv", x, kernel.astype(cfg.compute_dtype),
                         preferred_element_type=jnp.float32)
    elif self.head == "value":
      kernel = self.param("value_head", _param_init(("embed", "value"), nn.initializers.zeros),
                          (cfg.embed_dim, 1), cfg.params_dtype)
      out = jnp.einsum("bld,do->blo", x, kernel.astype(cfg.compute_dtype),
                       preferred_element_type=jnp.float32)[..., 0]
    else:
      out = x

    if self.head == "lm":
      out = constrain(out, ("batch", "length", "vocab"))
    if cache is None:
      return out
    if segment_ids is None:
      advance = jnp.full((b,), l, jnp.int32)
    else:
      advance = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
    chunk_k, chunk_v = new_layer_cache  # [Y, B, L, K, H]
    if not write_cache:
      return out, (chunk_k, chunk_v, advance)
    return out, write_chunk(cache, chunk_k, chunk_v, advance)


def write_chunk(cache: KVCache, chunk_k, chunk_v, advance) -> KVCache:
  """The cache with a chunk's keys/values ``[Y, B, L, K, H]`` written after each
  row's filled slots, and ``advance [B]`` more slots counted as filled."""
  b, l = chunk_k.shape[1], chunk_k.shape[2]
  rows = jnp.arange(b)[:, None]
  slots = cache.lengths[:, None] + jnp.arange(l)  # [B, L]; past S: dropped, never clamped
  return KVCache(
      k=cache.k.at[:, rows, slots].set(chunk_k.astype(cache.k.dtype), mode="drop"),
      v=cache.v.at[:, rows, slots].set(chunk_v.astype(cache.v.dtype), mode="drop"),
      lengths=jnp.minimum(cache.lengths + advance, cache.max_length))


def attention_views(max_length: int, smallest: int = 512) -> tuple[int, ...]:
  """The static cache views ``cached_apply`` chooses from: ``max_length`` and its
  halvings down to ``smallest`` (ascending). One view (no choice, one compiled
  program) when the cache is short: ``attention_views(384) == (384,)``,
  ``attention_views(4096) == (512, 1024, 2048, 4096)``."""
  views = [max_length]
  while views[-1] // 2 >= smallest and views[-1] % 2 == 0:
    views.append(views[-1] // 2)
  return tuple(sorted(views))


def cached_apply(model: "Transformer", params, tokens, cache: KVCache, *, segment_ids=None,
                 views: tuple[int, ...] | None = None, write: bool = True, logits_at=None):
  """``model.apply`` with a cache, its attention reading only the live prefix:
  the smallest of ``views`` (static slot counts, ascending, the last the whole
  cache; default ``attention_views``) that holds every row's filled slots, chosen
  on device (``lax.switch``, one compiled branch per view). Decode cost then
  follows the longest live row, not the cache's size. ``(output, new cache)``;
  with ``write=False``, ``(output, (chunk_k, chunk_v, advance))`` for
  ``write_chunk`` (a caller that itself branches writes once, after its branch)."""
  views = attention_views(cache.max_length) if views is None else tuple(views)
  if views[-1] != cache.max_length:
    raise ValueError(f"views {views} must end with the cache's {cache.max_length} slots.")

  if len(views) == 1:
    return model.apply({"params": params}, tokens, segment_ids=segment_ids, cache=cache,
                       write_cache=write, logits_at=logits_at)

  # The branches only read the cache; the one write happens after the switch, so
  # the buffer is updated in place instead of copied through the conditional.
  def view(slots):
    def run(operand):
      params_, cache_ = operand
      return model.apply({"params": params_}, tokens, segment_ids=segment_ids, cache=cache_,
                         attend=slots, write_cache=False, logits_at=logits_at)
    return run

  longest = jnp.max(cache.lengths)
  index = jnp.sum(jnp.asarray(views[:-1]) < longest)  # the first view >= longest
  out, chunk = jax.lax.switch(index, [view(v) for v in views], (params, cache))
  return out, (write_chunk(cache, *chunk) if write else chunk)


def predicted_by_previous(values: jax.Array) -> jax.Array:
  """Aligns per-position outputs with the token they score: ``out[:, t]`` comes
  from position ``t - 1`` (0 at t = 0). ``[B, L, ...] -> [B, L, ...]``."""
  return jnp.pad(values[:, :-1], [(0, 0), (1, 0)] + [(0, 0)] * (values.ndim - 2))


def _scored(segment_ids, length):
  """``[B, L]`` bool: tokens predicted from an earlier token of their own segment."""
  if segment_ids is None:
    return jnp.arange(length)[None, :] > 0
  same = jnp.pad(segment_ids[:, 1:] == segment_ids[:, :-1], ((0, 0), (1, 0)))
  return same & (segment_ids != 0)


def token_log_probs(cfg: ModelConfig, params, tokens, segment_ids=None, positions=None, *,
                    temperature: float = 1.0, with_entropy: bool = False):
  """Log-probability of each token given the ones before it under
  ``softmax(logits / temperature)``: ``[B, L]`` float32, 0 at index 0 (nothing
  predicts the first token) and at padding. With ``with_entropy`` also returns the
  entropy of the distribution that predicted each token ``[B, L]``."""
  scored = _scored(segment_ids, tokens.shape[1])
  chunk = cfg.logits_chunk
  if chunk and chunk < tokens.shape[1] - 1:
    hidden = Transformer(cfg, head="hidden").apply(
        {"params": params}, tokens, positions=positions, segment_ids=segment_ids)  # [B, L, D]
    picked, entropy = _chunked_head(cfg, params, hidden[:, :-1], tokens[:, 1:], temperature,
                                    with_entropy, chunk)  # [B, L-1]
  else:
    logits = Transformer(cfg).apply({"params": params}, tokens, positions=positions,
                                    segment_ids=segment_ids)  # [B, L, V]
    picked, entropy = _head_log_probs(logits[:, :-1], tokens[:, 1:], temperature, with_entropy)
  logp = jnp.where(scored, jnp.pad(picked, ((0, 0), (1, 0))), 0.0)
  if not with_entropy:
    return logp
  return logp, jnp.where(scored, jnp.pad(entropy, ((0, 0), (1, 0))), 0.0)


def _head_log_probs(logits, targets, temperature: float, with_entropy: bool):
  """``(log p(target), entropy or None)`` ``[B, T]`` from logits ``[B, T, V]``."""
  logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  picked = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
  if not with_entropy:
    return picked, None
  return picked, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def _chunked_head(cfg: ModelConfig, params, hidden, targets, temperature: float,
                  with_entropy: bool, chunk: int):
  """``_head_log_probs`` of the LM head over ``hidden [B, T, D]``, ``chunk``
  positions at a time (``lax.map``), each piece under ``jax.checkpoint``: the
  forward keeps no logits, the backward recomputes one piece's at a time. Peak
  logits memory is ``B x chunk x V`` float32 (times the softmax's few copies)
  instead of ``B x T x V``."""
  b, t, d = hidden.shape
  n = -(-t // chunk)
  hidden = jnp.pad(hidden, ((0, 0), (0, n * chunk - t), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, n * chunk - t)))
  pieces = (hidden.reshape(b, n, chunk, d).swapaxes(0, 1),  # [n, B, C, D]
            targets.reshape(b, n, chunk).swapaxes(0, 1))  # [n, B, C]
  if cfg.tie_embeddings:
    table, spec = params["embed"]["embedding"], "bcd,vd->bcv"  # [V, D]
  else:
    table, spec = params["lm_head"], "bcd,dv->bcv"  # [D, V]

  @jax.checkpoint
  def piece(table, h, target):
    logits = jnp.einsum(spec, h, table.astype(cfg.compute_dtype),
                        preferred_element_type=jnp.float32)  # [B, C, V]
    logits = constrain(logits, ("batch", "length", "vocab"))
    picked, entropy = _head_log_probs(logits, target, temperature, with_entropy)
    return picked, (entropy if with_entropy else jnp.zeros_like(picked))

  picked, entropy = jax.lax.map(lambda x: piece(table, *x), pieces)  # [n, B, C]
  unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]  # noqa: E731
  return unchunk(picked), (unchunk(entropy) if with_entropy else None)


def token_values(cfg: ModelConfig, params, tokens, segment_ids=None, positions=None):
  """A critic's (``head="value"``) value of each token, read at the position
  before it like a log-prob: ``[B, L]``, 0 where ``token_log_probs`` is 0."""
  values = Transformer(cfg, head="value").apply({"params": params}, tokens, positions=positions,
                                               segment_ids=segment_ids)  # [B, L]
  return jnp.where(_scored(segment_ids, tokens.shape[1]), predicted_by_previous(values), 0.0)


def _init_variables(cfg: ModelConfig, rng: jax.Array, head: str):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(cfg, head=head).init(rng, tokens)


def with_compute_dtype(cfg: ModelConfig, dtype: str, field: str = "dtype") -> ModelConfig:
  """``cfg`` computing (activations, matmuls, its KV cache) in ``dtype``, its params
  unchanged: one piece of a job (the rollout, the scoring pass) in another
  precision than training. ``""`` keeps ``cfg``. ``field`` names the config field
  in the error."""
  check_compute_dtype(dtype, field)
  return cfg if not dtype or dtype == cfg.dtype else dataclasses.replace(cfg, dtype=dtype)


def check_compute_dtype(dtype: str, field: str) -> None:
  """A piece's compute dtype: ``""`` (the model's own) or a float dtype name."""
  if dtype not in ("", "float32", "bfloat16", "float16"):
    raise ValueError(f"{field}={dtype!r} is not 'float32', 'bfloat16' or 'float16' ('' keeps "
                     "the model's dtype).")


def init_params(cfg: ModelConfig, rng: jax.Array, head: str = "lm"):
  """Random params (plain arrays, logical-axis boxes removed)."""
  return nn.unbox(_init_variables(cfg, rng, head))["params"]


def param_shapes(cfg: ModelConfig, head: str = "lm"):
  """``jax.ShapeDtypeStruct`` tree of the params, computed without allocating."""
  return nn.unbox(jax.eval_shape(functools.partial(_init_variables, cfg, head=head),
                                 jax.random.key(0)))["params"]


def logical_axes(cfg: ModelConfig, head: str = "lm"):
  """Tree of ``PartitionSpec`` whose entries are logical axis names, one per param."""
  boxed = jax.eval_shape(functools.partial(_init_variables, cfg, head=head), jax.random.key(0))
  return nn.get_partition_spec(boxed)["params"]


def model_flops_per_token(cfg: ModelConfig, length: int, training: bool = True) -> float:
  """Matmul FLOPs per token of a length-``length`` sequence: 2 per multiply-add in
  every projection, the LM head and attention (scores and mixing over all ``length``
  keys, as computed); a training step (forward + backward) is 3x the forward."""
  d, n, k, h, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_layer = 2 * d * h * (2 * n + 2 * k) + 2 * 3 * d * f + 2 * 2 * length * n * h
  forward = cfg.num_layers * per_layer + 2 * d * cfg.vocab_size
  return float(3 * forward if training else forward)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
