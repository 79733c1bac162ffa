"""Invariants of the decoder: cache == full forward, masks, causality, heads."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zsjax import model as M

# Prime-ish sizes catch transposed axes; 6 query heads over 2 kv heads is GQA.
CFG = M.ModelConfig(vocab_size=61, embed_dim=30, mlp_dim=46, num_layers=3, num_heads=6,
                    num_kv_heads=2, head_dim=10, arch="qwen2", qkv_bias=True,
                    rope_theta=1000.0)


@pytest.fixture(scope="module")
def params():
  p = M.init_params(CFG, jax.random.key(0))
  # Larger weights than the 0.02 init so that every mistake moves the logits.
  return jax.tree_util.tree_map(
      lambda x: x * 10.0 if x.ndim > 1 else x + 0.3, p)


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg, head="lm"):
  return jax.jit(M.Transformer(cfg, head=head).apply)


def forward(params, tokens, cfg=CFG, **kw):
  return _jitted_apply(cfg)({"params": params}, tokens, **kw)


def tokens_of(key, shape):
  return jax.random.randint(jax.random.key(key), shape, 0, CFG.vocab_size)


def test_param_tree_has_logical_axes_for_every_leaf(params):
  axes = M.logical_axes(CFG)
  shapes = jax.tree_util.tree_map(lambda x: x.shape, params)
  flat_axes = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  flat_shapes = jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
  assert len(flat_axes) == len(flat_shapes)
  for spec, shape in zip(flat_axes, flat_shapes):
    assert len(spec) == len(shape) and all(isinstance(a, str) for a in spec), (spec, shape)
  assert axes["layers"]["attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "heads", "head_dim")
  assert params["layers"]["attn"]["q_proj"]["kernel"].shape == (3, 30, 6, 10)


def test_incremental_decode_matches_full_forward(params):
  b, prompt, total = 3, 5, 13
  tokens = tokens_of(1, (b, total))
  full = forward(params, tokens)  # [B, L, V]
  cache = M.init_cache(CFG, b, 16)
  logits, cache = forward(params, tokens[:, :prompt], cache=cache)
  pieces = [logits]
  for t in range(prompt, total):
    logits, cache = forward(params, tokens[:, t:t + 1], cache=cache)
    pieces.append(logits)
  incremental = jnp.concatenate(pieces, axis=1)
  np.testing.assert_allclose(incremental, full, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(cache.lengths, [total] * b)


def test_ragged_prefill_then_per_row_decode(params):
  """Rows with different prompt lengths share one right-padded prefill, then
  decode at their own offsets; each row equals its own unpadded forward."""
  lengths = np.array([2, 7, 4])
  steps = 3
  seqs = [np.asarray(tokens_of(10 + i, (n + steps,))) for i, n in enumerate(lengths)]
  width = lengths.max()
  chunk = np.zeros((3, width), np.int32)
  segment = np.zeros((3, width), np.int32)
  for i, n in enumerate(lengths):
    chunk[i, :n] = seqs[i][:n]
    segment[i, :n] = 1
  cache = M.init_cache(CFG, 3, 12)
  logits, cache = forward(params, jnp.asarray(chunk), segment_ids=jnp.asarray(segment), cache=cache)
  np.testing.assert_array_equal(cache.lengths, lengths)
  step_logits = []
  for s in range(steps):
    nxt = np.array([[seqs[i][n + s]] for i, n in enumerate(lengths)], np.int32)
    out, cache = forward(params, jnp.asarray(nxt), cache=cache)
    step_logits.append(out[:, 0])
  for i, n in enumerate(lengths):
    ref = forward(params, jnp.asarray(seqs[i])[None])[0]  # [n + steps, V]
    np.testing.assert_allclose(logits[i, :n], ref[:n], atol=1e-4, rtol=1e-4)
    for s in range(steps):
      np.testing.assert_allclose(step_logits[s][i], ref[n + s], atol=1e-4, rtol=1e-4)


def test_logits_at_one_position_are_those_of_the_full_head_bit_for_bit(params):
  """A prefill's ``logits_at`` (each row's last position) gives exactly the
  full head's logits there, and the same cache: the rollout's prefills (prompt,
  observations, the simulator's prompt) read only these."""
  lengths = jnp.array([2, 7, 4])
  tokens = tokens_of(3, (3, 7))
  segment = (jnp.arange(7)[None, :] < lengths[:, None]).astype(jnp.int32)
  full, cache = forward(params, tokens, segment_ids=segment, cache=M.init_cache(CFG, 3, 12))
  last, cache_last = forward(params, tokens, segment_ids=segment, cache=M.init_cache(CFG, 3, 12),
                             logits_at=lengths - 1)
  assert last.shape == (3, 1, CFG.vocab_size)
  np.testing.assert_array_equal(last[:, 0], full[jnp.arange(3), lengths - 1])
  np.testing.assert_array_equal(cache_last.k, cache.k)
  views = M.attention_views(12, 4)
  step, _ = M.cached_apply(M.Transformer(CFG), params, tokens[:, :2], cache, views=views,
                           logits_at=jnp.array([0, 1, 1]))
  whole, _ = M.cached_apply(M.Transformer(CFG), params, tokens[:, :2], cache, views=views)
  np.testing.assert_array_equal(step[:, 0], whole[jnp.arange(3), jnp.array([0, 1, 1])])


def test_chunk_prefill_at_per_row_offsets_matches_full_forward(params):
  """An inserted chunk (e.g. search results) written after differently long
  contexts equals the full forward of the concatenation."""
  offsets = np.array([3, 6])
  chunk_len = 5
  seqs = [np.asarray(tokens_of(20 + i, (n + chunk_len,))) for i, n in enumerate(offsets)]
  cache = M.init_cache(CFG, 2, 16)
  ctx = np.zeros((2, offsets.max()), np.int32)
  seg = np.zeros_like(ctx)
  for i, n in enumerate(offsets):
    ctx[i, :n], seg[i, :n] = seqs[i][:n], 1
  _, cache = forward(params, jnp.asarray(ctx), segment_ids=jnp.asarray(seg), cache=cache)
  chunk = np.stack([s[n:] for s, n in zip(seqs, offsets)])
  out, cache = forward(params, jnp.asarray(chunk), cache=cache)
  for i, n in enumerate(offsets):
    ref = forward(params, jnp.asarray(seqs[i])[None])[0]
    np.testing.assert_allclose(out[i], ref[n:], atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(cache.lengths, offsets + chunk_len)


def test_live_prefix_views_equal_the_full_buffer_on_rows_of_very_different_lengths(params):
  """Decode and chunk prefill through ``cached_apply`` (cache views 8 / 16 / 32 /
  64, chosen on device from the longest row) give the logits and the cache of the
  plain call that reads all 64 slots, while the longest row crosses views."""
  assert M.attention_views(64, 8) == (8, 16, 32, 64) and M.attention_views(384) == (384,)
  lengths = np.array([2, 6, 1])
  seqs = [np.asarray(tokens_of(40 + i, (64,))) for i in range(3)]
  chunk = np.zeros((3, 6), np.int32)
  segment = np.zeros((3, 6), np.int32)
  for i, n in enumerate(lengths):
    chunk[i, :n], segment[i, :n] = seqs[i][:n], 1
  views = jax.jit(functools.partial(M.cached_apply, M.Transformer(CFG), views=(8, 16, 32, 64)))
  full, viewed = (forward(params, jnp.asarray(chunk), segment_ids=jnp.asarray(segment),
                          cache=M.init_cache(CFG, 3, 64, jnp.float32)),) * 2
  full_cache, viewed_cache = full[1], viewed[1]
  used = set()
  for s in range(40):  # row 1 reaches 46 slots; row 2 stays short (it writes every 4th step)
    write = np.array([1, 1, s % 4 == 0], np.int32)
    nxt = jnp.asarray([[seqs[i][min(int(full_cache.lengths[i]), 63)]] for i in range(3)],
                      jnp.int32)
    a, full_cache = forward(params, nxt, segment_ids=jnp.asarray(write)[:, None],
                            cache=full_cache)
    b, viewed_cache = views(params, nxt, viewed_cache, segment_ids=jnp.asarray(write)[:, None])
    used.add(min(v for v in (8, 16, 32, 64) if v >= int(jnp.max(viewed_cache.lengths)) - 1))
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  obs = jnp.asarray(np.stack([seqs[i][50:58] for i in range(3)]))  # an 8-token chunk prefill
  a, full_cache = forward(params, obs, cache=full_cache)
  b, viewed_cache = views(params, obs, viewed_cache)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(full_cache.lengths, viewed_cache.lengths)
  # deeper layers' keys differ by float rounding only (sums over fewer slots)
  np.testing.assert_allclose(full_cache.k, viewed_cache.k, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(full_cache.v, viewed_cache.v, atol=1e-4, rtol=1e-4)
  assert used >= {8, 16, 32, 64}  # every view was taken


def test_writes_past_the_cache_are_dropped_not_clamped(params):
  cache = M.init_cache(CFG, 1, 6)
  tokens = tokens_of(3, (1, 4))
  _, cache = forward(params, tokens, cache=cache)
  before = np.asarray(cache.k[:, :, :4])
  _, cache = forward(params, tokens_of(4, (1, 5)), cache=cache)  # 4 + 5 > 6 slots
  np.testing.assert_array_equal(cache.k[:, :, :4], before)
  assert int(cache.lengths[0]) == 6


def test_causality_by_gradient(params):
  l, t = 9, 4
  emb = params["embed"]["embedding"][tokens_of(5, (1, l))]  # [1, L, D]

  def logits_at_t(e):
    return jnp.sum(forward(params, None, embeddings=e)[0, t] ** 2)

  grad = jax.grad(logits_at_t)(emb)[0]  # [L, D]
  norms = np.linalg.norm(np.asarray(grad), axis=-1)
  assert np.all(norms[t + 1:] == 0.0), norms
  assert np.all(norms[:t + 1] > 0.0), norms


def test_left_padding_with_mask_and_positions_matches_unpadded(params):
  seq = tokens_of(6, (1, 7))
  pad = 4
  padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), seq], axis=1)
  mask = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.ones((1, 7), jnp.int32)], axis=1)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  out = forward(params, padded, positions=positions, segment_ids=mask)
  ref = forward(params, seq)
  np.testing.assert_allclose(out[:, pad:], ref, atol=1e-4, rtol=1e-4)
  assert np.all(np.isfinite(np.asarray(out)))  # fully masked pad rows stay finite


def test_packed_segments_match_separate_sequences(params):
  a, b = tokens_of(7, (1, 5)), tokens_of(8, (1, 6))
  packed = jnp.concatenate([a, b], axis=1)
  segment = jnp.asarray([[1] * 5 + [2] * 6])
  positions = jnp.asarray([list(range(5)) + list(range(6))])
  out = forward(params, packed, positions=positions, segment_ids=segment)
  np.testing.assert_allclose(out[:, :5], forward(params, a), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(out[:, 5:], forward(params, b), atol=1e-4, rtol=1e-4)


def test_remat_gives_same_loss_and_gradients(params):
  tokens = tokens_of(9, (2, 8))

  def loss(p, cfg):
    return jnp.mean(jax.nn.log_softmax(forward(p, tokens, cfg=cfg))[..., 0])

  base = jax.value_and_grad(loss)(params, CFG)
  for policy in ("full", "dots"):
    value, grads = jax.value_and_grad(loss)(params, dataclasses.replace(CFG, remat=policy))
    np.testing.assert_allclose(value, base[0], rtol=1e-6)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5),
                           grads, base[1])


def test_value_head_shares_the_trunk(params):
  tokens = tokens_of(11, (2, 6))
  critic = M.init_params(CFG, jax.random.key(1), head="value")
  assert "lm_head" not in critic and critic["value_head"].shape == (30, 1)
  assert not np.any(np.asarray(critic["value_head"]))  # zero-initialised
  trunk = {k: v for k, v in params.items() if k != "lm_head"}
  value_head = jax.random.normal(jax.random.key(2), (30, 1))
  values = M.Transformer(CFG, head="value").apply(
      {"params": {**trunk, "value_head": value_head}}, tokens)
  hidden = M.Transformer(CFG, head="hidden").apply({"params": trunk}, tokens)
  assert values.shape == (2, 6) and values.dtype == jnp.float32
  np.testing.assert_allclose(values, np.asarray(hidden) @ np.asarray(value_head)[:, 0],
                             atol=1e-5, rtol=1e-5)


def test_tied_embeddings_use_the_table_as_head():
  cfg = dataclasses.replace(CFG, tie_embeddings=True)
  p = M.init_params(cfg, jax.random.key(3))
  assert "lm_head" not in p
  tokens = tokens_of(12, (1, 4))
  hidden = M.Transformer(cfg, head="hidden").apply({"params": p}, tokens)
  logits = M.Transformer(cfg).apply({"params": p}, tokens)
  np.testing.assert_allclose(logits, np.asarray(hidden) @ np.asarray(p["embed"]["embedding"]).T,
                             atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_tracks_float32():
  params = M.init_params(CFG, jax.random.key(4))  # realistic scale for bf16 rounding
  tokens = tokens_of(13, (2, 8))
  cfg16 = dataclasses.replace(CFG, dtype="bfloat16")
  out16 = forward(params, tokens, cfg=cfg16)
  out32 = forward(params, tokens)
  assert out16.dtype == jnp.float32  # logits are always float32
  err = np.abs(np.asarray(out16) - np.asarray(out32)).max()
  scale = np.abs(np.asarray(out32)).max()
  assert 0 < err < 0.05 * scale


def test_rope_llama3_scaling_only_touches_long_wavelengths():
  cfg = dataclasses.replace(CFG, head_dim=64, rope_theta=500000.0, rope_scaling=M.RopeScaling(
      kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
      original_max_position_embeddings=1024))
  base = M.rope_inverse_frequencies(dataclasses.replace(cfg, rope_scaling=None))
  scaled = M.rope_inverse_frequencies(cfg)
  wavelen = 2 * np.pi / base
  short = wavelen < 1024 / 4
  long = wavelen > 1024 / 1
  np.testing.assert_array_equal(scaled[short], base[short])
  np.testing.assert_allclose(scaled[long], base[long] / 8.0, rtol=1e-6)
  medium = ~short & ~long
  assert medium.any() and np.all(scaled[medium] < base[medium])
  assert np.all(scaled[medium] > base[medium] / 8.0)


@pytest.mark.parametrize("field,value,needle", [
    ("num_kv_heads", 4, "num_heads=6 is not a multiple of num_kv_heads=4"),
    ("head_dim", 9, "head_dim=9 must be even"),
    ("arch", "gpt2", "arch='gpt2'"),
    ("remat", "some", "remat='some'"),
    ("dtype", "float99", "dtype='float99'"),
    ("embed_dim", 0, "embed_dim=0"),
])
def test_bad_config_names_field_and_value(field, value, needle):
  with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    dataclasses.replace(CFG, **{field: value})


def test_from_dict_rejects_unknown_fields():
  values = dataclasses.asdict(CFG)
  assert M.ModelConfig.from_dict(values) == CFG
  with pytest.raises(ValueError, match="n_layers"):
    M.ModelConfig.from_dict({**values, "n_layers": 2})


def test_qwen3_qk_norm_decode_matches_full_forward_and_changes_logits():
  """Qwen3's per-head query/key RMSNorm holds in cached decoding, and its scales
  matter (a model without them gives other logits)."""
  cfg = dataclasses.replace(CFG, arch="qwen3", qkv_bias=False, head_dim=14)
  params = jax.tree_util.tree_map(lambda x: x * 10.0 if x.ndim > 1 else x + 0.3,
                                  M.init_params(cfg, jax.random.key(2)))
  assert params["layers"]["attn"]["q_norm"]["scale"].shape == (3, 14)
  tokens = tokens_of(3, (2, 9))
  full = forward(params, tokens, cfg=cfg)
  cache = M.init_cache(cfg, 2, 12)
  logits, cache = forward(params, tokens[:, :4], cfg=cfg, cache=cache)
  pieces = [logits]
  for t in range(4, 9):
    logits, cache = forward(params, tokens[:, t:t + 1], cfg=cfg, cache=cache)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-4, rtol=1e-4)
  unit = jax.tree_util.tree_map(lambda x: x, params)
  scale = unit["layers"]["attn"]["q_norm"]["scale"]
  unit["layers"]["attn"]["q_norm"]["scale"] = jnp.ones_like(scale)
  assert not np.allclose(forward(unit, tokens, cfg=cfg), full, atol=1e-3)


def test_attention_kernel_is_chosen_by_backend_dtype_and_head_dim():
  def choose(cfg, backend, length=None, capability="9.0"):
    return M.attention_implementation(cfg, backend, length, capability)

  bf16 = dataclasses.replace(CFG, dtype="bfloat16", head_dim=64)
  assert choose(CFG, "cpu") == "einsum"  # auto off a GPU
  assert choose(bf16, "cpu") == "einsum"
  assert choose(bf16, "tpu") == "einsum"
  assert choose(bf16, "gpu") == "cudnn"
  assert choose(bf16, "gpu", 4096) == "cudnn"
  assert choose(bf16, "gpu", 4095) == "einsum"  # cuDNN's masked backward: even lengths
  assert choose(bf16, "gpu", capability="7.5") == "einsum"  # before Ampere
  assert choose(bf16, "gpu", capability=None) == "einsum"  # not CUDA (e.g. ROCm)
  assert choose(dataclasses.replace(bf16, dtype="float32"), "gpu") == "einsum"  # cuDNN: half only
  assert choose(dataclasses.replace(bf16, head_dim=256), "gpu") == "einsum"
  assert choose(dataclasses.replace(bf16, head_dim=60), "gpu") == "einsum"  # not a multiple of 8
  assert choose(dataclasses.replace(bf16, attention_impl="xla"), "gpu") == "xla"
  assert choose(dataclasses.replace(bf16, attention_impl="einsum"), "gpu") == "einsum"
  assert choose(dataclasses.replace(bf16, attention_impl="cudnn"), "gpu") == "cudnn"
  with pytest.raises(ValueError, match=r"attention_impl='cudnn'.*backend: 'cpu'.*attention_impl"):
    choose(dataclasses.replace(bf16, attention_impl="cudnn"), "cpu")
  with pytest.raises(ValueError, match=r"length: 7"):
    choose(dataclasses.replace(bf16, attention_impl="cudnn"), "gpu", 7)
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    dataclasses.replace(CFG, attention_impl="flash")


def test_the_model_calls_the_kernel_it_chose_where_it_has_no_cache(params, monkeypatch):
  # On a "GPU" in bfloat16 (the backend faked), scoring and a prefill into an empty
  # cache call jax.nn.dot_product_attention with cuDNN; decoding reads the cache with
  # the einsums. The fake runs the XLA path, so the outputs are checked too.
  calls = []
  real = jax.nn.dot_product_attention

  def recording(*args, implementation=None, **kw):
    calls.append(implementation)
    return real(*args, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  monkeypatch.setattr(M.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(M, "gpu_capability", lambda: "9.0")
  cfg = dataclasses.replace(CFG, dtype="bfloat16", head_dim=16)
  p = M.init_params(cfg, jax.random.key(3))
  tokens = tokens_of(21, (2, 8))
  model = M.Transformer(cfg)
  model.apply({"params": p}, tokens)
  assert calls and set(calls) == {"cudnn"}, calls  # (the layer scan traces its body more than once)
  calls.clear()
  cache = M.init_cache(cfg, 2, 16)
  _, cache = model.apply({"params": p}, tokens, cache=cache, attend=0)
  assert calls and set(calls) == {"cudnn"}, calls
  calls.clear()
  model.apply({"params": p}, tokens[:, :1], cache=cache)  # decode: the cache's einsums
  assert calls == []
  model.apply({"params": p}, tokens[:, :7])  # an odd length: cuDNN's backward cannot
  assert calls == []
  monkeypatch.setattr(M.jax, "default_backend", lambda: "cpu")
  model.apply({"params": p}, tokens)
  assert calls == []  # auto on a CPU: zsjax's einsums


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_the_xla_attention_kernel_equals_the_einsums(params, dtype):
  # jax.nn.dot_product_attention (the function cuDNN's kernel sits behind) against
  # zsjax's einsums: packed segments, padding, grouped-query heads; values and grads.
  base = dataclasses.replace(CFG, dtype=dtype, attention_impl="einsum")
  other = dataclasses.replace(base, attention_impl="xla")
  tokens = tokens_of(12, (2, 11))
  segment = jnp.asarray([[1] * 4 + [2] * 5 + [0] * 2, [1] * 9 + [0] * 2])
  positions = jnp.asarray([list(range(4)) + list(range(5)) + [0, 0], list(range(9)) + [0, 0]])
  real = np.asarray(segment) != 0

  def loss(p, cfg):
    logits = forward(p, tokens, cfg=cfg, positions=positions, segment_ids=segment)
    return jnp.sum(jnp.where(segment != 0, jax.nn.log_softmax(logits)[..., 3], 0.0)), logits

  (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params, base)
  (value2, logits2), grads2 = jax.value_and_grad(loss, has_aux=True)(params, other)
  tol = 1e-4 if dtype == "float32" else 5e-2
  np.testing.assert_allclose(np.asarray(logits2)[real], np.asarray(logits)[real], atol=tol * 10,
                             rtol=tol)
  np.testing.assert_allclose(value2, value, rtol=tol)
  if dtype == "float32":
    for x, y in zip(jax.tree_util.tree_leaves(grads2), jax.tree_util.tree_leaves(grads)):
      # the weights are scaled up (sharp softmaxes): compared as whole tensors
      assert np.linalg.norm(x - y) <= 1e-3 * np.linalg.norm(y) + 1e-6, (
          np.linalg.norm(x - y), np.linalg.norm(y))
  assert np.all(np.isfinite(np.asarray(logits2)))  # fully masked padding stays finite
