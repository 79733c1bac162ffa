"""The RL loop (``job="rl"``): REINFORCE, GRPO or PPO against a search engine.

One step (METHOD.md §4-§7, DESIGN.md "RL step"):

  1. rollout: P prompts x n samples through ``zsjax.rollout`` (one XLA program),
     noise probability ``p = noise_probability(step)`` drawn on device;
  2. rewards on the host: the last ``<answer>`` of each *response* scored against
     the row's gold answers (F1 by default), placed on the last policy token;
  3. reference log-probs (frozen params, never donated, never in the optimizer),
     old log-probs (the current policy, at the sampling temperature), and for PPO
     the critic's values;
  4. advantages (``zsjax.rl``): raw reward, group-normalised reward with unique
     group ids (one group per prompt of the step), or GAE over policy tokens
     with the k1 KL in the per-token reward;
  5. ``epochs x minibatches`` of ``update(state, batch, rng) -> (state, metrics)``,
     jitted with donated state and explicit shardings; each minibatch may be
     split into micro-batches whose gradients add up to the minibatch's exactly
     (token-mean over the whole minibatch); PPO also updates its critic with its
     own optimizer.

An update whose loss or gradient is not finite is not applied (params and
optimizer state stay as they were) and the run stops with an error naming the
step and the metric, before any checkpoint of that step is written.

The data position is a function of the step (``zsjax.data.batch_rows``) and
every random draw is ``fold_in(key(seed), step)``, so a run resumed from its
last checkpoint reproduces the uninterrupted run.

Shape legend: N trajectories of a step (P prompts x n samples), M a minibatch,
S the context cap (``rollout.max_length``), V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from zsjax import data as data_lib
from zsjax import hf, rewards, rl
from zsjax import rollout as rollout_lib
from zsjax import sampling as sampling_lib
from zsjax import search as search_lib
from zsjax import template
from zsjax.checkpoint import Checkpointer, abstract_like
from zsjax.metrics import MetricWriter, drop_steps_after
from zsjax.model import ModelConfig, init_params, token_log_probs, token_values
from zsjax.sharding import ShardingPlan, is_main_process
from zsjax.train_step import (TrainState, init_state, make_accumulating_update,
                              make_chunked_score_fn, make_optimizer, state_shardings)

REWARDS = {"f1": rewards.f1, "em": rewards.exact_match, "substring_em": rewards.substring_match}
ENGINES = ("simulator", "bm25", "http")


# ----------------------------------------------------------------- settings


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails early, naming the field, the value and the fix."""
  r = config.rl
  if r.algorithm not in rl.ALGORITHMS:
    raise ValueError(f"config.rl.algorithm={r.algorithm!r} is not one of {rl.ALGORITHMS}.")
  if r.reward not in REWARDS:
    raise ValueError(f"config.rl.reward={r.reward!r} is not one of {sorted(REWARDS)}.")
  if r.loss_mask not in ("policy", "response"):
    raise ValueError(f"config.rl.loss_mask={r.loss_mask!r}: use 'policy' (only sampled tokens, "
                     "the method) or 'response' (inserted documents too, the ablation).")
  if config.engine.kind not in ENGINES:
    raise ValueError(f"config.engine.kind={config.engine.kind!r} is not one of {ENGINES}.")
  n = r.prompts_per_step * r.samples_per_prompt
  if not 0 < r.minibatch_size <= n:
    raise ValueError(f"config.rl.minibatch_size={r.minibatch_size} must lie in [1, {n}] (the "
                     "trajectories of a step, prompts_per_step x samples_per_prompt).")
  for name in ("micro_batch_size", "score_batch_size"):
    value = r[name]
    sizes = {r.minibatch_size, n % r.minibatch_size or r.minibatch_size}
    if value <= 0 or any(size % value for size in sizes) or n % value:
      raise ValueError(f"config.rl.{name}={value} must divide config.rl.minibatch_size="
                       f"{r.minibatch_size}, the last minibatch ({n % r.minibatch_size or n}) "
                       f"and the {n} trajectories of a step.")
  if r.algorithm == "grpo" and r.samples_per_prompt < 2:
    raise ValueError(f"config.rl.samples_per_prompt={r.samples_per_prompt}: GRPO needs groups "
                     "of at least 2 samples per prompt.")
  if r.total_steps <= 0 or r.epochs <= 0:
    raise ValueError(f"config.rl.total_steps={r.total_steps} and config.rl.epochs={r.epochs} "
                     "must be positive.")


def rollout_config(config) -> rollout_lib.RolloutConfig:
  """The rollout's static settings; the curriculum maps onto (start, end, base):
  ``fixed`` is start = end = probability."""
  c, ro = config.curriculum, config.rollout
  if c.kind == "exponential":
    start, end = c.start, c.end
  elif c.kind == "fixed":
    start = end = c.probability
  else:
    raise ValueError(f"config.curriculum.kind={c.kind!r} is not 'exponential' or 'fixed'.")
  return rollout_lib.RolloutConfig(
      max_turns=ro.max_turns, max_new_tokens=ro.max_new_tokens, max_obs_tokens=ro.max_obs_tokens,
      max_length=ro.max_length, max_query_tokens=ro.max_query_tokens, noise_start=start,
      noise_end=end, noise_base=c.base, total_steps=config.rl.total_steps)


# ------------------------------------------------------------------- models


def load_model(section, plan: ShardingPlan, rng: jax.Array, vocab_size: int, eos_ids, *,
               what: str):
  """``(cfg, params)`` from ``section.checkpoint`` (a local HF directory) or, when
  empty, a random model from ``section.model`` (vocab 0 = the tokenizer's)."""
  if section.checkpoint:
    cfg, params = hf.load_checkpoint(section.checkpoint, dtype=section.param_dtype, plan=plan)
    # Compute dtype and remat are run settings, not part of the checkpoint.
    cfg = dataclasses.replace(cfg, dtype=section.dtype, remat=section.remat)
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
    params = jax.jit(init_params, static_argnums=0, out_shardings=plan.params(cfg))(cfg, rng)
  if cfg.vocab_size < vocab_size:
    raise ValueError(f"{what}: the model's vocab_size={cfg.vocab_size} is smaller than the "
                     f"tokenizer's {vocab_size} tokens; use the tokenizer the model was trained "
                     "with (config.tokenizer).")
  return cfg, params


def critic_from_policy(policy_params, cfg: ModelConfig, rng: jax.Array):
  """The PPO critic starts as the policy's trunk plus a zero value head."""
  fresh = init_params(cfg, rng, head="value")
  return {k: (policy_params[k] if k in policy_params else v) for k, v in fresh.items()}


def copy_tree(tree, shardings):
  """A fresh copy (separate buffers): the reference must survive donation of the policy."""
  return jax.jit(lambda t: jax.tree_util.tree_map(jnp.copy, t), out_shardings=shardings)(tree)


# -------------------------------------------------------------------- the job


@flax.struct.dataclass
class RLState:
  """Everything a checkpoint holds as arrays."""

  policy: TrainState
  critic: TrainState | None


def to_host(tree):
  """Device arrays -> numpy, gathering rows from every process when there are several."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def place(array: np.ndarray, sharding):
  """A host array (the same on every process) onto ``sharding``."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def policy_answer(tokenizer, tokens: np.ndarray, loss_mask: np.ndarray) -> str | None:
  """The last ``<answer>`` of the text the policy itself sampled (the loss-mask
  tokens of one row): never the prompt, and never a document or the
  invalid-action message, which names the tags."""
  sampled = np.asarray(tokens)[np.asarray(loss_mask) == 1]
  return rewards.extract_answer(tokenizer.decode(sampled.tolist(), skip_special_tokens=True))


def score_answers(tokenizer, traj, golds: list[list[str]], reward: str) -> dict[str, np.ndarray]:
  """Per-row answers (``policy_answer``) scored on the host: ``{"train": [N], "f1",
  "em", "substring_em", "has_answer", "answers"}`` (``answers``: strings or None)."""
  out = {k: np.zeros(len(golds), np.float32) for k in ("f1", "em", "substring_em", "has_answer")}
  answers = []
  for i, gold in enumerate(golds):
    answer = policy_answer(tokenizer, traj.tokens[i], traj.loss_mask[i])
    answers.append(answer)
    out["f1"][i] = rewards.f1(answer, gold)
    out["em"][i] = rewards.exact_match(answer, gold)
    out["substring_em"][i] = rewards.substring_match(answer, gold)
    out["has_answer"][i] = answer is not None
  out["train"] = out[reward].copy()
  out["answers"] = answers
  return out


class RLTrainer:
  """Builds models, engine and jitted functions from a config; ``train()`` runs."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
    check_config(config)
    self.config, self.workdir = config, Path(workdir)
    r = self.settings = config.rl
    self.plan = plan = ShardingPlan.from_config(config)
    self.n_rows = r.prompts_per_step * r.samples_per_prompt  # N
    if self.n_rows % plan.batch_divisor or r.micro_batch_size % plan.batch_divisor \
        or r.score_batch_size % plan.batch_divisor:
      raise ValueError(
          f"config.rl: trajectories per step ({self.n_rows}), micro_batch_size "
          f"({r.micro_batch_size}) and score_batch_size ({r.score_batch_size}) must be "
          f"multiples of data x fsdp = {plan.batch_divisor} (mesh {plan.sizes}).")
    seed_key = jax.random.key(config.seed)
    self.key = seed_key

    tokenizer_dir = config.tokenizer or config.policy.checkpoint
    if not tokenizer_dir:
      raise ValueError("config.tokenizer is empty and config.policy.checkpoint too; give a "
                       "local directory with the tokenizer.")
    self.tokenizer = tok = hf.load_tokenizer(tokenizer_dir)
    eos_ids = tuple(i for i in (tok.eos_token_id,) if i is not None)
    self.policy_cfg, self.initial_params = load_model(
        config.policy, plan, jax.random.fold_in(seed_key, 1), len(tok), eos_ids, what="policy")
    self.static = rollout_lib.prepare_static_tokens(tok, vocab_size=self.policy_cfg.vocab_size,
                                                    eos_ids=self.policy_cfg.eos_token_ids or eos_ids)
    self.matcher = template.build_tag_matcher(tok, vocab_size=self.policy_cfg.vocab_size)
    self.sampling = sampling_lib.from_config(config.sampling)
    self.rollout_config = rollout_config(config)
    self.sim_prompt = search_lib.SimulatorPrompt(config.simulator.template
                                                 or search_lib.DEFAULT_SIMULATOR_TEMPLATE,
                                                 top_k=config.engine.top_k)
    self._build_engine(seed_key)
    self.rollout = rollout_lib.shard_rollout(
        rollout_lib.make_rollout(self.policy_cfg, self.matcher, self.static, self.engine,
                                 self.rollout_config, self.sampling),
        plan, self.policy_cfg, engine_state_shardings=self.engine_shardings)

    # The paper's 320 trajectories in minibatches of 256 make two updates (256 + 64).
    self.minibatch_sizes = [r.minibatch_size] * (self.n_rows // r.minibatch_size)
    if self.n_rows % r.minibatch_size:
      self.minibatch_sizes.append(self.n_rows % r.minibatch_size)
    updates_per_step = r.epochs * len(self.minibatch_sizes)
    total_updates = r.total_steps * updates_per_step
    self.tx, self.schedule = make_optimizer(
        r.learning_rate, total_updates, warmup_fraction=r.warmup_fraction,
        decay=r.get("decay", "constant"), weight_decay=r.weight_decay, clip_norm=r.grad_clip)
    self.shardings = state_shardings(self.policy_cfg, self.tx, plan)
    self.ref_params = copy_tree(self.initial_params, self.shardings.params)
    self.critic_tx = self.critic_shardings = None
    if r.algorithm == "ppo":
      self.critic_tx, self.critic_schedule = make_optimizer(
          r.critic_learning_rate, total_updates, warmup_fraction=r.critic_warmup_fraction,
          weight_decay=r.weight_decay, clip_norm=r.grad_clip)
      self.critic_shardings = state_shardings(self.policy_cfg, self.critic_tx, plan, head="value")
    self._build_functions()
    self.data = data_lib.load_qa(config.data.train_files, on_error=config.data.on_error,
                                 limit=config.data.limit or None)

  # -- construction

  def _build_engine(self, seed_key):
    config, tok = self.config, self.tokenizer
    kind = config.engine.kind
    self.host_search = None
    if kind == "simulator":
      sim = config.simulator
      self.sim_cfg, self.sim_params = load_model(
          sim, self.plan, jax.random.fold_in(seed_key, 2), len(tok), self.static.eos_ids,
          what="simulator")
      marker = f"Doc {config.engine.top_k + 1}"
      matcher = template.build_tag_matcher(tok, vocab_size=self.sim_cfg.vocab_size, tags=(marker,))
      suffix = tok.encode(self.sim_prompt.split("q", "a", True)[1], add_special_tokens=False)
      max_prompt = sim.max_prefix_tokens + self.rollout_config.max_query_tokens + len(suffix) + 8
      self.engine = rollout_lib.simulator_engine(
          self.sim_cfg, matcher, self.static, max_new_tokens=sim.max_new_tokens,
          max_prompt=max_prompt, sampling=sampling_lib.Sampling(temperature=sim.temperature)
          if sim.temperature > 0 else sampling_lib.Greedy(), marker_bytes=len(marker))
      self.engine_state = self.sim_params
      self.engine_shardings = self.plan.params(self.sim_cfg)
      return
    host = search_lib.engine_from_config(config.engine, self.sim_prompt)
    self.host_search = search_lib.HostSearch(host, tok, self.rollout_config.max_obs_tokens,
                                             pad_id=self.static.pad_id)
    self.engine = rollout_lib.host_engine(self.host_search)
    self.engine_state = jnp.zeros((), jnp.int32)
    self.engine_shardings = None

  def _build_functions(self):
    r, plan, cfg = self.settings, self.plan, self.policy_cfg
    temperature = self.sampling.temperature
    self.log_probs = make_chunked_score_fn(
        lambda p, t, g: token_log_probs(cfg, p, t, g, temperature=temperature), plan,
        self.shardings.params, r.score_batch_size)
    fields = ("tokens", "segment_ids", "loss_mask", "old_logp", "ref_logp", "advantages",
              "returns", "old_values")
    self.minibatch_shardings = {k: plan.rows(2) for k in fields}

    def policy_objective(params, mb, normalizer, rng):
      del rng
      logp, entropy = token_log_probs(cfg, params, mb["tokens"], mb["segment_ids"],
                                      temperature=temperature, with_entropy=True)
      return rl.policy_loss(
          logp, mb["old_logp"], mb["ref_logp"], mb["advantages"], mb["loss_mask"],
          clip_eps=r.clip_eps, kl_coef=0.0 if r.algorithm == "ppo" else r.kl_coef,
          kl_type=r.kl_type, entropy=entropy, entropy_coef=r.entropy_coef,
          dual_clip=r.dual_clip or None, aggregation=r.aggregation, normalizer=normalizer)

    micro = r.micro_batch_size
    self.update = make_accumulating_update(policy_objective, self.tx, plan, self.shardings,
                                           self.minibatch_shardings, micro, r.aggregation,
                                           self.schedule)
    self.values = self.critic_update = None
    if r.algorithm == "ppo":
      self.values = make_chunked_score_fn(lambda p, t, g: token_values(cfg, p, t, g), plan,
                                          self.critic_shardings.params, r.score_batch_size)

      def critic_objective(params, mb, normalizer, rng):
        del rng
        values = token_values(cfg, params, mb["tokens"], mb["segment_ids"])
        return rl.value_loss(values, mb["old_values"], mb["returns"], mb["loss_mask"],
                             clip=r.value_clip, aggregation=r.aggregation, normalizer=normalizer)

      self.critic_update = make_accumulating_update(
          critic_objective, self.critic_tx, plan, self.critic_shardings, self.minibatch_shardings,
          micro, r.aggregation, self.critic_schedule, prefix="critic/")
    row1, row2, repl = plan.rows(1), plan.rows(2), plan.replicated()
    self.advantages = jax.jit(
        lambda *a: rl.advantages_and_returns(r.algorithm, *a, kl_coef=r.kl_coef, gamma=r.gamma,
                                             lam=r.lam),
        in_shardings=(row1, row2, row1, row2, row2, row2), out_shardings=(row2, row2, row2))
    self.take = jax.jit(lambda tree, idx: jax.tree_util.tree_map(lambda x: x[idx], tree),
                        in_shardings=(self.minibatch_shardings, repl),
                        out_shardings=self.minibatch_shardings)

  def initial_state(self) -> RLState:
    params = copy_tree(self.initial_params, self.shardings.params)
    opt = jax.jit(self.tx.init, in_shardings=(self.shardings.params,),
                  out_shardings=self.shardings.opt_state)(params)
    policy = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), self.plan.replicated()),
                        params=params, opt_state=opt)
    critic = None
    if self.critic_tx is not None:
      cparams = jax.jit(lambda p: critic_from_policy(p, self.policy_cfg,
                                                     jax.random.fold_in(self.key, 3)),
                        out_shardings=self.critic_shardings.params)(self.initial_params)
      copt = jax.jit(self.critic_tx.init, in_shardings=(self.critic_shardings.params,),
                     out_shardings=self.critic_shardings.opt_state)(cparams)
      critic = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), self.plan.replicated()),
                          params=cparams, opt_state=copt)
    return RLState(policy=policy, critic=critic)

  def state_target(self) -> RLState:
    """The checkpoint's abstract tree (shapes, dtypes, shardings) for restoring."""
    def abstract(tx, shardings, head):
      shapes = jax.eval_shape(lambda: init_state(self.policy_cfg, tx, jax.random.key(0), head))
      return abstract_like(shapes, shardings)
    critic = None
    if self.critic_tx is not None:
      critic = abstract(self.critic_tx, self.critic_shardings, "value")
    return RLState(policy=abstract(self.tx, self.shardings, "lm"), critic=critic)

  # -- one step

  def step_rows(self, step: int) -> np.ndarray:
    return data_lib.batch_rows(len(self.data), self.settings.prompts_per_step, self.config.seed,
                               step - 1)

  def rollout_batch(self, rows: np.ndarray):
    examples = [self.data[int(i)] for i in rows]
    questions = [e["question"] for e in examples]
    first_golds = [e["golden_answers"][0] for e in examples]
    instruction = self.config.data.get("instruction") or template.INSTRUCTION
    prompts = [template.render_prompt(q, self.tokenizer, instruction,
                                      use_chat_template=self.config.data.chat_template)
               for q in questions]
    try:
      batch = rollout_lib.prepare_batch(
          self.tokenizer, prompts, questions, first_golds, self.sim_prompt,
          samples_per_prompt=self.settings.samples_per_prompt, pad_id=self.static.pad_id,
          prompt_width=self.config.rollout.max_prompt_tokens,
          sim_prefix_width=self.config.simulator.max_prefix_tokens)
    except ValueError as e:
      raise ValueError(f"{e} The widths are config.rollout.max_prompt_tokens="
                       f"{self.config.rollout.max_prompt_tokens} and "
                       f"config.simulator.max_prefix_tokens="
                       f"{self.config.simulator.max_prefix_tokens}.") from None
    if self.host_search is not None:
      self.host_search.set_context(questions, first_golds)
    golds = [list(e["golden_answers"]) for e in examples for _ in
             range(self.settings.samples_per_prompt)]
    return batch, golds

  def train_step(self, state: RLState, step: int, fault: dict | None = None):
    """One RL step; returns the new state and the step's metrics (host floats)."""
    r, plan = self.settings, self.plan
    timings = {}
    t0 = time.perf_counter()
    batch, golds = self.rollout_batch(self.step_rows(step))
    rng = jax.random.fold_in(self.key, step)
    traj = self.rollout(state.policy.params, self.engine_state, batch,
                        jax.random.fold_in(rng, 0), jnp.int32(step))
    traj = to_host(traj)
    timings["rollout_s"] = time.perf_counter() - t0
    if fault and fault.get("kill_at_step") == step:
      os.kill(os.getpid(), signal.SIGKILL)  # simulated crash mid-step (resume tests)

    t = time.perf_counter()
    scores = score_answers(self.tokenizer, traj, golds, r.reward)
    reward = scores["train"]
    if fault and fault.get("nan_at_step") == step:
      reward = np.full_like(reward, np.nan)
    timings["reward_s"] = time.perf_counter() - t

    t = time.perf_counter()
    s = traj.tokens.shape[1]
    valid = np.arange(s)[None, :] < traj.lengths[:, None]
    if r.loss_mask == "policy":
      mask = traj.loss_mask
    else:
      mask = (valid & (np.arange(s)[None, :] >= traj.prompt_lengths[:, None])).astype(np.int32)
    row2, row1 = plan.rows(2), plan.rows(1)
    tokens = place(traj.tokens, row2)
    segments = place(valid.astype(np.int32), row2)
    mask_d = place(mask.astype(np.int32), row2)
    ref_logp = self.log_probs(self.ref_params, tokens, segments)
    old_logp = self.log_probs(state.policy.params, tokens, segments)
    if self.values is not None:
      old_values = self.values(state.critic.params, tokens, segments)
    else:
      old_values = jnp.zeros_like(old_logp)
    group_ids = np.arange(self.n_rows) // r.samples_per_prompt  # one group per prompt of the step
    adv, returns, _ = self.advantages(place(reward, row1), mask_d, place(group_ids, row1),
                                      old_logp, ref_logp, old_values)
    jax.block_until_ready(adv)
    timings["score_s"] = time.perf_counter() - t

    t = time.perf_counter()
    full = {"tokens": tokens, "segment_ids": segments, "loss_mask": mask_d, "old_logp": old_logp,
            "ref_logp": ref_logp, "advantages": adv, "returns": returns, "old_values": old_values}
    order_rng = np.random.default_rng([self.config.seed, step])
    policy, critic = state.policy, state.critic
    update_metrics = []
    for _ in range(r.epochs):
      order = order_rng.permutation(self.n_rows)
      for start, size in zip(np.cumsum([0] + self.minibatch_sizes), self.minibatch_sizes):
        idx = place(np.sort(order[start:start + size]), plan.replicated())
        mb = self.take(full, idx)
        if critic is not None:
          critic, cm = self.critic_update(critic, mb, jax.random.fold_in(rng, 2))
        else:
          cm = {}
        policy, pm = self.update(policy, mb, jax.random.fold_in(rng, 1))
        update_metrics.append({**pm, **cm})
    update_metrics = to_host(update_metrics)
    timings["update_s"] = time.perf_counter() - t
    timings["step_s"] = time.perf_counter() - t0

    every = int(r.get("sample_every", 0) or 0)
    if every and step % every == 0 and is_main_process():
      self.write_samples(step, traj, golds, scores)

    metrics = {k: float(np.mean([m[k] for m in update_metrics])) for k in update_metrics[0]}
    generated = float(traj.loss_mask.sum())
    response = traj.lengths - traj.prompt_lengths
    searches = float(traj.searches.sum())
    metrics.update({
        "reward/train": float(np.mean(reward)), "reward/f1": float(scores["f1"].mean()),
        "reward/em": float(scores["em"].mean()),
        "reward/substring_em": float(scores["substring_em"].mean()),
        "reward/has_answer": float(scores["has_answer"].mean()),
        "response/length": float(response.mean()),
        "response/policy_tokens": generated / self.n_rows,
        "response/inserted_tokens": float((response - traj.loss_mask.sum(1)).mean()),
        "rollout/turns": float(traj.turns.mean()), "rollout/searches": searches / self.n_rows,
        "rollout/noisy_share": float(traj.noisy_calls.sum()) / max(searches, 1.0),
        "rollout/answered": float(traj.answered.mean()),
        "rollout/truncated": float(traj.truncated.mean()),
        "rollout/failed_searches": float(traj.failed_searches.sum()),
        "curriculum/p_noise": float(self.rollout_config.noise_probability(step)),
        "perf/tokens_per_s": generated / max(timings["rollout_s"], 1e-9),
        **{f"time/{k}": v for k, v in timings.items()},
    })
    return RLState(policy=policy, critic=critic), metrics

  def write_samples(self, step: int, traj, golds, scores) -> None:
    """Appends the step's first ``rl.sample_rows`` trajectories, decoded, to
    ``WORKDIR/samples.jsonl``: what the policy wrote and what the engine answered."""
    records = []
    for i in range(min(int(self.settings.get("sample_rows", 4)), len(golds))):
      start, end = int(traj.prompt_lengths[i]), int(traj.lengths[i])
      records.append({
          "step": step, "row": i, "golden_answers": golds[i], "answer": scores["answers"][i],
          "reward": float(scores["train"][i]), "searches": int(traj.searches[i]),
          "noisy_calls": int(traj.noisy_calls[i]),
          "prompt": self.tokenizer.decode(np.asarray(traj.tokens[i, :start]).tolist(),
                                          skip_special_tokens=True),
          "response": self.tokenizer.decode(np.asarray(traj.tokens[i, start:end]).tolist(),
                                            skip_special_tokens=True)})
    with open(self.workdir / "samples.jsonl", "a") as f:
      for record in records:
        f.write(json.dumps(record) + "\n")

  # -- the loop

  def train(self) -> dict:
    from tqdm import tqdm

    config, r = self.config, self.settings
    workdir = self.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    ck = config.checkpoint
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=ck.max_to_keep,
                                async_save=ck.async_save)
    state, extra, resumed = checkpointer.restore_or(self.state_target(), self.initial_state)
    start = int(extra.get("step", 0)) if resumed else 0
    if resumed and extra.get("algorithm", r.algorithm) != r.algorithm:
      raise ValueError(f"{workdir} holds a {extra['algorithm']!r} run; config.rl.algorithm="
                       f"{r.algorithm!r}. Use a new --workdir.")
    if is_main_process():
      drop_steps_after(workdir / "samples.jsonl", start)  # as MetricWriter does for metrics
    fault = dict(config.get("fault_injection", {}) or {})
    last = {}
    with MetricWriter(workdir, resume_from=start) as writer, tqdm(
        total=r.total_steps, initial=start, desc=f"rl/{r.algorithm}", unit="step",
        disable=not is_main_process() or not config.get("progress", True)) as bar:
      for step in range(start + 1, r.total_steps + 1):
        state, metrics = self.train_step(state, step, fault)
        try:
          last = writer.write(step, metrics)
        except FloatingPointError as e:
          checkpointer.close()
          raise FloatingPointError(
              f"RL step {step}: {e} The update was not applied; the last checkpoint is step "
              f"{checkpointer.latest_step()}. Lower config.rl.learning_rate or check the "
              "rewards.") from None
        bar.set_postfix({"reward": f"{last['reward/train']:.3f}",
                         "p_noise": f"{last['curriculum/p_noise']:.3f}"}, refresh=False)
        bar.update(1)
        if step % ck.every == 0 or step == r.total_steps:
          checkpointer.save(step, state, extra={
              "step": step, "algorithm": r.algorithm, "seed": config.seed,
              "data_position": step * r.prompts_per_step})
    checkpointer.close()
    summary = {"final_step": r.total_steps, "resumed_from": start, **last}
    if config.checkpoint.export_hf and is_main_process():
      export = hf.save_checkpoint(workdir / "hf_export", self.policy_cfg, state.policy.params)
      self.tokenizer.save_pretrained(str(export))
      summary["hf_export"] = str(export)
    if is_main_process():
      (workdir / "rl_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def with_synthetic_data(config: ml_collections.ConfigDict, workdir: str | Path):
  """When ``config.synthetic_data`` is set and no data is given: a tiny world
  (``zsjax.tinyworld``) built in ``WORKDIR/world`` supplies the training questions,
  the tokenizer and the BM25 corpus. Returns an updated copy of the config."""
  if not config.get("synthetic_data") or config.data.train_files:
    return config
  from zsjax import tinyworld

  world = tinyworld.ensure(Path(workdir) / "world", config.seed)
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.train_files = world["train"]
  config.tokenizer = config.tokenizer or world["tokenizer"]
  config.engine.corpus = config.engine.corpus or world["corpus"]
  return config


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config = with_synthetic_data(config, workdir)
  return RLTrainer(config, workdir).train()


__all__ = ["RLTrainer", "RLState", "run", "check_config", "rollout_config",
           "score_answers", "load_model", "critic_from_policy", "with_synthetic_data"]
