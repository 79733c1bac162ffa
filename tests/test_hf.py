"""HF interop: logit parity with transformers' PyTorch models, export round trip,
and clear errors for checkpoints that do not fit."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from zsjax import hf
from zsjax import model as M

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# Tiny random configs: prime-ish widths, GQA, tied and untied heads, Qwen biases,
# Llama-3 rope scaling (original context 16 < test length 37, so it matters).
CASES = {
    "qwen2_tied_gqa": ("qwen2", dict(vocab_size=97, hidden_size=36, intermediate_size=58,
                                     num_hidden_layers=3, num_attention_heads=6,
                                     num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_untied": ("qwen2", dict(vocab_size=89, hidden_size=28, intermediate_size=50,
                                   num_hidden_layers=2, num_attention_heads=7,
                                   num_key_value_heads=1, tie_word_embeddings=False,
                                   rope_theta=1e6)),
    "llama3_scaled_gqa": ("llama", dict(vocab_size=101, hidden_size=40, intermediate_size=66,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=10,
                                        rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                                        tie_word_embeddings=False)),
    # Qwen3: per-head q/k RMSNorm, a head dimension that is not hidden / heads
    "qwen3_tied_gqa": ("qwen3", dict(vocab_size=97, hidden_size=36, intermediate_size=58,
                                     num_hidden_layers=2, num_attention_heads=6,
                                     num_key_value_heads=2, head_dim=10,
                                     tie_word_embeddings=True)),
    "qwen3_untied_bias": ("qwen3", dict(vocab_size=89, hidden_size=28, intermediate_size=50,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=1, head_dim=12,
                                        tie_word_embeddings=False, attention_bias=True,
                                        rope_theta=1e6)),
    "llama_tied_biases": ("llama", dict(vocab_size=83, hidden_size=30, intermediate_size=44,
                                        num_hidden_layers=2, num_attention_heads=5,
                                        num_key_value_heads=5, tie_word_embeddings=True,
                                        attention_bias=True, mlp_bias=True)),
}


def make_torch_model(name, seed=0):
  arch, kwargs = CASES[name]
  torch.manual_seed(seed)
  if arch == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs))
  elif arch == "qwen3":
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kwargs))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
  with torch.no_grad():  # the default init is too small for logits to tell layers apart
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  return model.eval()


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def jax_logits(cfg, params, tokens):
  return np.asarray(M.Transformer(cfg).apply({"params": params}, jnp.asarray(tokens)))


def random_tokens(vocab, shape=(2, 37), seed=0):
  return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
  model = make_torch_model(request.param)
  directory = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(directory)
  return request.param, model, directory


def test_logit_parity_with_transformers(saved):
  name, model, directory = saved
  cfg, params = hf.load_checkpoint(directory)
  assert cfg.arch == CASES[name][0]
  tokens = random_tokens(cfg.vocab_size)
  ref = torch_logits(model, tokens)
  ours = jax_logits(cfg, params, tokens)
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() < 1e-4, np.abs(ours - ref).max()
  if cfg.rope_scaling is not None:  # the scaling is exercised, not inert
    unscaled = jax_logits(dataclasses.replace(cfg, rope_scaling=None), params, tokens)
    assert np.abs(unscaled - ref).max() > 1e-3


def test_export_round_trip_through_from_pretrained(saved, tmp_path):
  name, model, directory = saved
  cfg, params = hf.load_checkpoint(directory)
  tokens = random_tokens(cfg.vocab_size, seed=1)
  ours = jax_logits(cfg, params, tokens)
  # A small shard limit forces several files plus an index.
  hf.save_checkpoint(tmp_path, cfg, params, max_shard_bytes=20_000)
  assert (tmp_path / hf.INDEX_FILE).exists()
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  assert type(reloaded).__name__ == type(model).__name__
  assert np.abs(torch_logits(reloaded, tokens) - ours).max() < 1e-4
  cfg2, params2 = hf.load_checkpoint(tmp_path)  # and back through our own reader
  assert cfg2 == cfg
  np.testing.assert_array_equal(jax_logits(cfg2, params2, tokens), ours)


def test_bfloat16_checkpoint_loads_without_torch_in_the_path(tmp_path):
  model = make_torch_model("qwen2_untied").to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  cfg, params = hf.load_checkpoint(tmp_path)  # upcast to float32
  assert params["embed"]["embedding"].dtype == jnp.float32
  expected = model.model.embed_tokens.weight.float().detach().numpy()
  np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]), expected)
  cfg16, params16 = hf.load_checkpoint(tmp_path, dtype=jnp.bfloat16)
  assert cfg16.param_dtype == "bfloat16" and params16["lm_head"].dtype == jnp.bfloat16


def test_exported_weights_are_readable_like_every_other_file(saved, tmp_path):
  import os

  cfg, params = hf.load_checkpoint(saved[2])
  for shard_bytes in (10**12, 20_000):  # one file, and shards with an index
    out = hf.save_checkpoint(tmp_path / str(shard_bytes), cfg, params,
                             max_shard_bytes=shard_bytes)
    (out / "plain.txt").write_text("x")
    plain = os.stat(out / "plain.txt").st_mode & 0o777
    weights = sorted(out.glob("*.safetensors"))
    assert weights and all(os.stat(w).st_mode & 0o777 == plain for w in weights)


def test_value_head_load_skips_lm_head(saved):
  name, _, directory = saved
  cfg, critic = hf.load_checkpoint(directory, head="value")
  assert "lm_head" not in critic and critic["value_head"].shape == (cfg.embed_dim, 1)
  values = M.Transformer(cfg, head="value").apply(
      {"params": critic}, jnp.asarray(random_tokens(cfg.vocab_size)))
  assert values.shape == (2, 37)


def _rewrite_tensor(directory, name, transform):
  path = directory / "model.safetensors"
  tensors = load_file(path)
  tensors = transform(tensors, name)
  save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture()
def llama_dir(tmp_path):
  make_torch_model("llama3_scaled_gqa").save_pretrained(tmp_path)
  return tmp_path


def test_wrong_shape_names_tensor_and_both_shapes(llama_dir):
  name = "model.layers.1.self_attn.k_proj.weight"

  def grow(tensors, key):
    tensors[key] = np.zeros((24, 40), np.float32)  # expected [20, 40]
    return tensors

  _rewrite_tensor(llama_dir, name, grow)
  with pytest.raises(hf.CheckpointError) as err:
    hf.load_checkpoint(llama_dir)
  msg = str(err.value)
  assert name in msg and "[24, 40]" in msg and "[20, 40]" in msg and "model.safetensors" in msg


def test_missing_tensor_is_named(llama_dir):
  name = "model.layers.0.mlp.up_proj.weight"
  _rewrite_tensor(llama_dir, name, lambda t, k: {n: v for n, v in t.items() if n != k})
  with pytest.raises(hf.CheckpointError, match=name.replace(".", r"\.") + r".*\[66, 40\]"):
    hf.load_checkpoint(llama_dir)


def test_extra_layer_means_config_mismatch(llama_dir):
  def add_layer(tensors, key):
    tensors[key] = np.zeros((40,), np.float32)
    return tensors

  _rewrite_tensor(llama_dir, "model.layers.2.input_layernorm.weight", add_layer)
  with pytest.raises(hf.CheckpointError, match=r"model\.layers\.2\.input_layernorm.*2 layers"):
    hf.load_checkpoint(llama_dir)


def test_missing_files_and_unknown_architecture(llama_dir, tmp_path_factory):
  with pytest.raises(hf.CheckpointError, match="does not exist"):
    hf.load_checkpoint(llama_dir / "nope")
  empty = tmp_path_factory.mktemp("empty")
  with pytest.raises(hf.CheckpointError, match="config.json is missing"):
    hf.load_checkpoint(empty)
  (empty / "config.json").write_text((llama_dir / "config.json").read_text())
  (empty / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(hf.CheckpointError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
    hf.load_checkpoint(empty)
  config = json.loads((llama_dir / "config.json").read_text())
  config["model_type"] = "gpt2"
  (llama_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf.CheckpointError, match=r"model_type='gpt2'.*supported"):
    hf.load_checkpoint(llama_dir)


def test_index_pointing_at_missing_shard(llama_dir):
  (llama_dir / hf.INDEX_FILE).write_text(json.dumps(
      {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
  with pytest.raises(hf.CheckpointError, match="model-00002-of-00002.safetensors"):
    hf.load_checkpoint(llama_dir)


def test_config_round_trip_keeps_every_field():
  for name in CASES:
    arch, kwargs = CASES[name]
    config_cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                  "llama": transformers.LlamaConfig}[arch]
    cfg = hf.config_from_hf(config_cls(**kwargs).to_dict())
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


def test_tokenizer_loads_from_a_local_directory_only(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<eos>"])
  tok.train_from_iterator(["the search engine writes documents", "search for the answer"] * 5,
                          trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                              unk_token="<unk>")
  fast.save_pretrained(tmp_path / "tok")
  loaded = hf.load_tokenizer(tmp_path / "tok")
  text = "search the documents"
  assert loaded.encode(text) == fast.encode(text)
  assert loaded.decode(loaded.encode(text)).replace(" ", "") == text.replace(" ", "")
  with pytest.raises(FileNotFoundError, match="not a hub|local directory"):
    hf.load_tokenizer(tmp_path / "Qwen/Qwen2.5-3B")


def test_end_tokens_come_from_generation_config_and_config(tmp_path):
  """Qwen2.5 instruct checkpoints name one end token in config.json and two in
  generation_config.json; generation stops on every one, as in transformers."""
  arch, kwargs = CASES["qwen2_tied_gqa"]
  (tmp_path / "config.json").write_text(json.dumps(
      transformers.Qwen2Config(**kwargs, eos_token_id=5).to_dict()))
  assert hf.read_config(tmp_path).eos_token_ids == (5,)
  transformers.GenerationConfig(eos_token_id=[7, 5]).save_pretrained(tmp_path)
  got = hf.read_config(tmp_path).eos_token_ids
  want = transformers.GenerationConfig.from_pretrained(tmp_path).eos_token_id
  assert got == (7, 5) and list(got) == list(want)
  (tmp_path / "generation_config.json").write_text("{not json")
  with pytest.raises(hf.CheckpointError, match="generation_config.json is not valid JSON"):
    hf.read_config(tmp_path)


def test_a_truncated_file_an_invalid_index_and_a_nan_weight_are_named(llama_dir):
  name = "model.layers.1.mlp.down_proj.weight"

  def poison(tensors, key):
    tensors[key] = tensors[key].copy()
    tensors[key][3, 5] = np.nan
    return tensors

  _rewrite_tensor(llama_dir, name, poison)
  with pytest.raises(hf.CheckpointError, match=name.replace(".", r"\.") + r"' holds 1 non-finite"):
    hf.load_checkpoint(llama_dir)

  weights = llama_dir / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])  # a cut-off copy
  with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: not a readable safetensors "
                                               r"file .*truncated"):
    hf.load_checkpoint(llama_dir)

  (llama_dir / hf.INDEX_FILE).write_text('{"weight_map": {"model.norm.weight": ')
  with pytest.raises(hf.CheckpointError, match=r"model\.safetensors\.index\.json is not a valid "
                                               r"index"):
    hf.load_checkpoint(llama_dir)
