"""The RL step as data: the batch an update reads, and every jitted program of the
RL job in one place.

  trajectories + rewards --make_rl_batch--> RLBatch --update_epochs--> new RLState

``make_rl_batch`` puts the rollout on the devices and scores it (reference and
old log-probs, PPO's old values, advantages and returns: METHOD.md §6);
``update_epochs`` runs ``epochs x minibatches`` of the donated, accumulating
update (``zsjax.train_step.make_accumulating_update``), the critic first for
PPO; ``step_metrics`` assembles the step's slash-named metrics.

``RLPrograms`` holds the optimizers and the jitted functions, each with explicit
shardings, built once from the config by ``build_programs``; it has no state.

Shape legend: N trajectories of a step (P prompts x n samples), M a minibatch,
S the context cap (``rollout.max_length``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from zsjax import packing, rl
from zsjax.checkpoint import abstract_like
from zsjax.model import ModelConfig, init_params, token_log_probs, token_values, with_compute_dtype
from zsjax.rewards import AnswerScores
from zsjax.rl_settings import HOST_MEMORY, RLSettings
from zsjax.sharding import ShardingPlan, place, to_host
from zsjax.train_step import (TrainState, init_state, make_accumulating_update,
                              make_chunked_score_fn, make_optimizer, make_packed_update,
                              state_shardings)


@flax.struct.dataclass
class RLState:
  """Everything a checkpoint holds as arrays."""

  policy: TrainState
  critic: TrainState | None


@flax.struct.dataclass
class RLBatch:
  """One step's trajectories as the update reads them (rows: [N] or a minibatch [M])."""

  tokens: jax.Array  # [N, S] prompt + response
  segment_ids: jax.Array  # [N, S] 1 on held tokens, 0 on padding
  loss_mask: jax.Array  # [N, S] 1 on the tokens the loss covers
  old_logp: jax.Array  # [N, S] the current policy's log-probs at the sampling temperature
  # (zeros with rl.old_logp_pass False: the update uses its own)
  ref_logp: jax.Array  # [N, S] the frozen reference's
  advantages: jax.Array  # [N, S]
  returns: jax.Array  # [N, S] PPO's value targets (zeros otherwise)
  old_values: jax.Array  # [N, S] PPO's critic values (zeros otherwise)


@flax.struct.dataclass
class PackedRLBatch(RLBatch):
  """An ``RLBatch`` micro-batch of packed rows (``zsjax.packing``): segment ids 1, 2,
  ... per trajectory, ``positions`` restarting in each, and ``loss_mask`` as float
  weights (per-sequence ones folded in for ``seq_mean_token_mean``)."""

  positions: jax.Array  # [R, W]


def _policy_objective(settings: RLSettings, cfg: ModelConfig, temperature: float, params, mb: RLBatch,
                      normalizer, rng):
  del rng
  logp, entropy = token_log_probs(cfg, params, mb.tokens, mb.segment_ids,
                                  getattr(mb, "positions", None),
                                  temperature=temperature, with_entropy=True)
  # without the scoring pass (rl.old_logp_pass False: one update a step, on-policy) the
  # old log-probs are these, held fixed: the ratio is 1, its gradient the policy's
  old_logp = mb.old_logp if settings.old_logp_pass else jax.lax.stop_gradient(logp)
  return rl.policy_loss(
      logp, old_logp, mb.ref_logp, mb.advantages, mb.loss_mask, clip_eps=settings.clip_eps,
      kl_coef=settings.loss_kl_coef, kl_type=settings.kl_type,
      entropy=entropy, entropy_coef=settings.entropy_coef, dual_clip=settings.dual_clip or None,
      aggregation=settings.aggregation, normalizer=normalizer)


def _critic_objective(settings: RLSettings, cfg: ModelConfig, params, mb: RLBatch, normalizer, rng):
  del rng
  values = token_values(cfg, params, mb.tokens, mb.segment_ids, getattr(mb, "positions", None))
  return rl.value_loss(values, mb.old_values, mb.returns, mb.loss_mask, clip=settings.value_clip,
                       aggregation=settings.aggregation, normalizer=normalizer)


def _advantages(settings: RLSettings, rewards, mask, group_ids, old_logp, ref_logp, values):
  return rl.advantages_and_returns(settings.algorithm, rewards, mask, group_ids, old_logp,
                                   ref_logp, values, kl_coef=settings.kl_coef,
                                   gamma=settings.gamma, lam=settings.lam)


def _take_rows(batch: RLBatch, rows) -> RLBatch:
  return jax.tree_util.tree_map(lambda x: x[rows], batch)


def critic_from_policy(policy_params, cfg: ModelConfig, rng: jax.Array):
  """The PPO critic starts as the policy's trunk plus a zero value head."""
  fresh = init_params(cfg, rng, head="value")
  return {k: (policy_params[k] if k in policy_params else v) for k, v in fresh.items()}


def _copy(tree):
  return jax.tree_util.tree_map(jnp.copy, tree)


def _as_reference(dtype: str, tree):
  """A separate copy of policy params, floating leaves in ``dtype`` ("" = as they are)."""
  def cast(x):
    if dtype and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return jnp.copy(x)
  return jax.tree_util.tree_map(cast, tree)


def in_memory(shardings, kind: str | None):
  """``shardings`` (a tree of NamedSharding) in memory ``kind`` (None: the default)."""
  return jax.tree_util.tree_map(lambda s: s.with_memory_kind(kind) if kind else s, shardings)


@dataclasses.dataclass(frozen=True, eq=False)
class RLPrograms:
  """The RL job's optimizers and jitted programs (``build_programs``)."""

  settings: RLSettings
  policy_cfg: ModelConfig
  plan: ShardingPlan
  minibatch_sizes: tuple[int, ...]  # one epoch's minibatches (the last may be smaller)
  tx: Any
  schedule: Callable  # update index -> learning rate
  shardings: TrainState
  critic_tx: Any
  critic_schedule: Callable | None
  critic_shardings: TrainState | None
  log_probs: Callable  # (params, tokens, segment_ids) -> [N, S]
  values: Callable | None  # PPO: (critic params, tokens, segment_ids) -> [N, S]
  advantages: Callable  # (rewards, mask, group_ids, old_logp, ref_logp, values) -> 3 x [N, S]
  take: Callable  # (RLBatch, rows [M]) -> RLBatch
  update: Callable  # (TrainState, RLBatch, rng) -> (TrainState, metrics)
  critic_update: Callable | None
  copy_params: Callable  # a fresh copy (separate buffers) of policy params
  # params -> the frozen reference: the loaded params themselves, or a copy in
  # rl.reference_dtype, in host memory with rl.offload_reference (brought to the
  # devices only for its scoring pass)
  reference_params: Callable | None = None
  # rl.pack_tokens > 0 (zsjax.packing): (params, tokens, segment_ids, positions) ->
  # [R, W] on score_batch_size packed rows, and updates over packed micro-batches
  # (train_step.make_packed_update: (state, micro_batches, normalizer, rng))
  packed_log_probs: Callable | None = None
  packed_values: Callable | None = None
  packed_update: Callable | None = None
  packed_critic_update: Callable | None = None

  def placed_optimizer(self, state: "RLState", host: bool) -> "RLState":
    """``state`` with its optimizer states in host memory (``host``) or on the
    devices, when ``rl.offload_optimizer``; else ``state`` as it is. The update needs
    them on the devices; the rollout and scoring do not."""
    if not self.settings.offload_optimizer:
      return state

    def put(train_state, shardings):
      if train_state is None:
        return None
      target = in_memory(shardings.opt_state, HOST_MEMORY if host else "device")
      return train_state.replace(opt_state=jax.device_put(train_state.opt_state, target))

    return RLState(policy=put(state.policy, self.shardings),
                   critic=put(state.critic, self.critic_shardings))

  def initial_state(self, params, key: jax.Array) -> RLState:
    """The policy (a copy of ``params``) and, for PPO, its critic, with fresh optimizers."""
    replicated = self.plan.replicated()
    policy_params = self.copy_params(params)
    opt = jax.jit(self.tx.init, in_shardings=(self.shardings.params,),
                  out_shardings=self.shardings.opt_state)(policy_params)
    policy = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
                        params=policy_params, opt_state=opt)
    critic = None
    if self.critic_tx is not None:
      critic_params = jax.jit(
          functools.partial(critic_from_policy, cfg=self.policy_cfg, rng=key),
          out_shardings=self.critic_shardings.params)(params)
      critic_opt = jax.jit(self.critic_tx.init, in_shardings=(self.critic_shardings.params,),
                           out_shardings=self.critic_shardings.opt_state)(critic_params)
      critic = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
                          params=critic_params, opt_state=critic_opt)
    return self.placed_optimizer(RLState(policy=policy, critic=critic), host=True)

  def state_target(self) -> RLState:
    """The checkpoint's abstract tree (shapes, dtypes, shardings) for restoring."""
    def abstract(tx, shardings, head):
      shapes = jax.eval_shape(lambda: init_state(self.policy_cfg, tx, jax.random.key(0), head))
      return abstract_like(shapes, shardings)
    critic = None
    if self.critic_tx is not None:
      critic = abstract(self.critic_tx, self.critic_shardings, "value")
    return RLState(policy=abstract(self.tx, self.shardings, "lm"), critic=critic)


def minibatch_sizes(rows: int, minibatch_size: int) -> tuple[int, ...]:
  """The paper's 320 trajectories in minibatches of 256 make two updates (256 + 64)."""
  sizes = [minibatch_size] * (rows // minibatch_size)
  return tuple(sizes + ([rows % minibatch_size] if rows % minibatch_size else []))


def build_programs(settings: RLSettings, policy_cfg: ModelConfig, plan: ShardingPlan,
                   temperature: float) -> RLPrograms:
  """Optimizers and jitted programs for ``settings`` (``rl_settings.check_config``)."""
  r = settings
  sizes = minibatch_sizes(r.rows, r.minibatch_size)
  total_updates = r.horizon * r.epochs * len(sizes)  # the schedule's span
  tx, schedule = make_optimizer(r.learning_rate, total_updates, warmup_fraction=r.warmup_fraction,
                                decay=r.decay, weight_decay=r.weight_decay, clip_norm=r.grad_clip)
  shardings = state_shardings(policy_cfg, tx, plan)
  row1, row2, repl = plan.rows(1), plan.rows(2), plan.replicated()
  batch_shardings = RLBatch(*[row2] * len(dataclasses.fields(RLBatch)))
  # scoring (old and reference log-probs) may compute in another precision than the update
  score_cfg = with_compute_dtype(policy_cfg, r.scoring_dtype, "config.rl.scoring_dtype")
  log_probs = make_chunked_score_fn(
      functools.partial(token_log_probs, score_cfg, temperature=temperature), plan,
      shardings.params, r.score_batch_size)
  update = make_accumulating_update(
      functools.partial(_policy_objective, r, policy_cfg, temperature), tx, plan, shardings,
      batch_shardings, r.micro_batch_size, r.aggregation, schedule)
  critic_tx = critic_schedule = critic_shardings = values = critic_update = None
  if r.algorithm == "ppo":
    critic_tx, critic_schedule = make_optimizer(
        r.critic_learning_rate, total_updates, warmup_fraction=r.critic_warmup_fraction,
        weight_decay=r.weight_decay, clip_norm=r.grad_clip)
    critic_shardings = state_shardings(policy_cfg, critic_tx, plan, head="value")
    values = make_chunked_score_fn(functools.partial(token_values, policy_cfg), plan,
                                   critic_shardings.params, r.score_batch_size)
    critic_update = make_accumulating_update(
        functools.partial(_critic_objective, r, policy_cfg), critic_tx, plan, critic_shardings,
        batch_shardings, r.micro_batch_size, r.aggregation, critic_schedule, prefix="critic/")
  packed = {}
  if r.pack_tokens:
    packed_r = dataclasses.replace(r, aggregation="token_mean")  # weights carry seq_mean
    micro_shardings = PackedRLBatch(*[row2] * len(dataclasses.fields(PackedRLBatch)))

    def scorer(fn, param_shardings):
      def score(params, tokens, segment_ids, positions):
        with plan.context():
          return fn(params, tokens, segment_ids, positions)
      return jax.jit(score, in_shardings=(param_shardings, row2, row2, row2), out_shardings=row2)

    packed["packed_log_probs"] = scorer(
        functools.partial(token_log_probs, score_cfg, temperature=temperature), shardings.params)
    packed["packed_update"] = make_packed_update(
        functools.partial(_policy_objective, packed_r, policy_cfg, temperature), tx, plan,
        shardings, micro_shardings, schedule)
    if r.algorithm == "ppo":
      packed["packed_values"] = scorer(functools.partial(token_values, policy_cfg),
                                       critic_shardings.params)
      packed["packed_critic_update"] = make_packed_update(
          functools.partial(_critic_objective, packed_r, policy_cfg), critic_tx, plan,
          critic_shardings, micro_shardings, critic_schedule, prefix="critic/")
  return RLPrograms(
      **packed,
      settings=r, policy_cfg=policy_cfg, plan=plan, minibatch_sizes=sizes, tx=tx,
      schedule=schedule, shardings=shardings, critic_tx=critic_tx,
      critic_schedule=critic_schedule, critic_shardings=critic_shardings, log_probs=log_probs,
      values=values,
      advantages=jax.jit(functools.partial(_advantages, r),
                         in_shardings=(row1, row2, row1, row2, row2, row2),
                         out_shardings=(row2, row2, row2)),
      take=jax.jit(_take_rows, in_shardings=(batch_shardings, repl),
                   out_shardings=batch_shardings),
      update=update, critic_update=critic_update,
      copy_params=jax.jit(_copy, out_shardings=shardings.params),
      reference_params=(
          jax.jit(functools.partial(_as_reference, r.reference_dtype),
                  out_shardings=in_memory(shardings.params,
                                          HOST_MEMORY if r.offload_reference else None))
          # as loaded: the loaded params themselves (never donated; the policy trains
          # its own copy), so the device holds no third copy
          if r.reference_dtype or r.offload_reference else (lambda params: params)))


def loss_mask_of(traj, kind: str) -> np.ndarray:
  """``"policy"``: the tokens the policy sampled (the method); ``"response"``:
  everything after the prompt, inserted documents too (the ablation). ``[N, S]``."""
  if kind == "policy":
    return np.asarray(traj.loss_mask, np.int32)
  position = np.arange(traj.tokens.shape[1])[None, :]
  held = position < traj.lengths[:, None]
  return (held & (position >= traj.prompt_lengths[:, None])).astype(np.int32)


def make_rl_batch(programs: RLPrograms, state: RLState, ref_params, traj, rewards: np.ndarray
                  ) -> RLBatch:
  """The step's ``RLBatch`` from host trajectories and per-row rewards ``[N]``:
  GRPO groups are one per prompt of the step (rows g*n .. g*n+n-1)."""
  r, plan = programs.settings, programs.plan
  row1, row2 = plan.rows(1), plan.rows(2)
  held = np.arange(traj.tokens.shape[1])[None, :] < traj.lengths[:, None]
  tokens = place(traj.tokens, row2)
  segment_ids = place(held.astype(np.int32), row2)
  mask = place(loss_mask_of(traj, r.loss_mask), row2)
  if r.pack_tokens:  # padding-free: packed rows, results back in the padded layout
    layout = packing.pack(traj.lengths, r.pack_tokens, multiple=r.score_batch_size)
    packed = (layout.scatter(traj.tokens), layout.segment_ids(), layout.positions())

    def score(fn, params):
      parts = [to_host(fn(params, *(place(x[c:c + r.score_batch_size], row2) for x in packed)))
               for c in range(0, layout.rows, r.score_batch_size)]
      return place(layout.gather(np.concatenate(parts), traj.tokens.shape[1]), row2)

    log_probs = functools.partial(score, programs.packed_log_probs)
    values = functools.partial(score, programs.packed_values)
  else:
    log_probs = lambda params: programs.log_probs(params, tokens, segment_ids)  # noqa: E731
    values = lambda params: programs.values(params, tokens, segment_ids)  # noqa: E731
  if r.offload_reference:  # on the devices for this pass only
    ref_params = jax.device_put(ref_params, in_memory(programs.shardings.params, "device"))
  ref_logp = log_probs(ref_params)
  del ref_params
  # rl.old_logp_pass False: the update computes them (zeros here, never read)
  old_logp = (log_probs(state.policy.params) if r.old_logp_pass
              else jnp.zeros_like(ref_logp))
  if programs.values is not None:
    old_values = values(state.critic.params)
  else:
    old_values = jnp.zeros_like(old_logp)
  group_ids = np.arange(len(rewards)) // r.samples_per_prompt
  advantages, returns, _ = programs.advantages(place(rewards, row1), mask, place(group_ids, row1),
                                               old_logp, ref_logp, old_values)
  return RLBatch(tokens=tokens, segment_ids=segment_ids, loss_mask=mask, old_logp=old_logp,
                 ref_logp=ref_logp, advantages=advantages, returns=returns, old_values=old_values)


def packed_micro_batches(programs: RLPrograms, host: RLBatch, rows: np.ndarray
                         ) -> tuple[list[PackedRLBatch], float]:
  """A minibatch (``rows`` of the step's host ``RLBatch``) packed into micro-batches
  of ``micro_batch_size`` rows of ``pack_tokens`` tokens, and its normalizer: the
  loss-mask token count (``token_mean``) or the count of sequences with loss
  tokens (``seq_mean_token_mean``, each sequence's tokens weighted 1 / its count)."""
  r, row2 = programs.settings, programs.plan.rows(2)
  lengths = host.segment_ids[rows].astype(bool).sum(axis=1)
  layout = packing.pack(lengths, r.pack_tokens, multiple=r.micro_batch_size)
  mask = host.loss_mask[rows].astype(np.float32)
  if r.aggregation == "token_mean":
    normalizer = float(mask.sum())
  else:
    counts = mask.sum(axis=1)
    mask = mask / np.maximum(counts, 1.0)[:, None]
    normalizer = float((counts > 0).sum())
  fields = {f.name: layout.scatter(getattr(host, f.name)[rows])
            for f in dataclasses.fields(RLBatch)}
  fields.update(loss_mask=layout.scatter(mask), segment_ids=layout.segment_ids(),
                positions=layout.positions())
  m = r.micro_batch_size
  micro = [PackedRLBatch(**{k: place(v[c:c + m], row2) for k, v in fields.items()})
           for c in range(0, layout.rows, m)]
  return micro, normalizer


def update_epochs(programs: RLPrograms, state: RLState, batch: RLBatch, order_rng, rng
                  ) -> tuple[RLState, list[dict]]:
  """``epochs x minibatches`` updates over ``batch``, each epoch in a new row order
  drawn from ``order_rng`` (a numpy Generator); returns the device metrics of each."""
  state = programs.placed_optimizer(state, host=False)  # (rl.offload_optimizer)
  policy, critic = state.policy, state.critic
  sizes = programs.minibatch_sizes
  n = sum(sizes)
  metrics = []
  host = to_host(batch) if programs.settings.pack_tokens else None
  for _ in range(programs.settings.epochs):
    order = order_rng.permutation(n)
    for start, size in zip(np.cumsum((0,) + sizes), sizes):
      rows = np.sort(order[start:start + size])
      critic_metrics = {}
      if host is not None:  # padding-free micro-batches of this minibatch's trajectories
        micro, normalizer = packed_micro_batches(programs, host, rows)
        if critic is not None:
          critic, critic_metrics = programs.packed_critic_update(
              critic, micro, normalizer, jax.random.fold_in(rng, 2))
        policy, policy_metrics = programs.packed_update(policy, micro, normalizer,
                                                        jax.random.fold_in(rng, 1))
        metrics.append({**policy_metrics, **critic_metrics})
        continue
      minibatch = programs.take(batch, place(rows, programs.plan.replicated()))
      if critic is not None:
        critic, critic_metrics = programs.critic_update(critic, minibatch,
                                                        jax.random.fold_in(rng, 2))
      policy, policy_metrics = programs.update(policy, minibatch, jax.random.fold_in(rng, 1))
      metrics.append({**policy_metrics, **critic_metrics})
  return programs.placed_optimizer(RLState(policy=policy, critic=critic), host=True), metrics


def step_metrics(update_metrics: list[dict], traj, scores: AnswerScores, reward: np.ndarray,
                 p_noise: float, timings: dict) -> dict[str, float]:
  """The step's metrics: updates averaged, rewards, rollout shape, curriculum, time."""
  metrics = {k: float(np.mean([m[k] for m in update_metrics])) for k in update_metrics[0]}
  rows = len(reward)
  generated = float(traj.loss_mask.sum())
  response = traj.lengths - traj.prompt_lengths
  searches = float(traj.searches.sum())
  metrics.update({
      "reward/train": float(np.mean(reward)), "reward/f1": float(scores.f1.mean()),
      "reward/em": float(scores.em.mean()),
      "reward/substring_em": float(scores.substring_em.mean()),
      "reward/has_answer": float(scores.has_answer.mean()),
      "response/length": float(response.mean()),
      "response/policy_tokens": generated / rows,
      "response/inserted_tokens": float((response - traj.loss_mask.sum(1)).mean()),
      "rollout/turns": float(traj.turns.mean()), "rollout/searches": searches / rows,
      "rollout/noisy_share": float(traj.noisy_calls.sum()) / max(searches, 1.0),
      "rollout/answered": float(traj.answered.mean()),
      "rollout/truncated": float(traj.truncated.mean()),
      "rollout/failed_searches": float(traj.failed_searches.sum()),
      "rollout/failed_share": float(traj.failed_searches.sum()) / searches if searches else 0.0,
      "rollout/end_token_turns": float(traj.end_token_turns.mean()),
      "curriculum/p_noise": float(p_noise),
      "perf/tokens_per_s": generated / max(timings["rollout_s"], 1e-9),
      **{f"time/{k}": v for k, v in timings.items()},
  })
  return metrics


def sample_records(tokenizer, step: int, traj, golds, scores: AnswerScores,
                   rows: int) -> list[dict]:
  """The step's first ``rows`` trajectories decoded: what the policy wrote, what
  the engine answered, the answer and its reward (``WORKDIR/samples.jsonl``)."""
  def decode(ids):
    return tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=True)

  records = []
  for i in range(min(rows, len(golds))):
    start, end = int(traj.prompt_lengths[i]), int(traj.lengths[i])
    records.append({
        "step": step, "row": i, "golden_answers": golds[i], "answer": scores.answers[i],
        "reward": float(scores.train[i]), "searches": int(traj.searches[i]),
        "noisy_calls": int(traj.noisy_calls[i]), "prompt": decode(traj.tokens[i, :start]),
        "response": decode(traj.tokens[i, start:end])})
  return records


def source_metrics(traj, scores: AnswerScores, sources) -> dict[str, float]:
  """Reward, EM and searches per trajectory for each data source of the batch
  (``data_source`` of the training rows, e.g. a benchmark's name, or the tiny
  world's ``single_hop`` / ``two_hop``): ``reward/f1/<source>``, ``reward/em/<source>``,
  ``rollout/searches/<source>`` (sources absent from the batch are left out)."""
  sources = np.asarray(sources)
  names = sorted(set(sources.tolist()))
  out = {}
  for name in names:
    rows = sources == name
    out[f"reward/f1/{name}"] = float(scores.f1[rows].mean())
    out[f"reward/em/{name}"] = float(scores.em[rows].mean())
    out[f"rollout/searches/{name}"] = float(np.asarray(traj.searches)[rows].mean())
  return out


__all__ = ["RLState", "RLBatch", "RLPrograms", "build_programs",
           "minibatch_sizes", "critic_from_policy", "loss_mask_of", "make_rl_batch",
           "update_epochs", "step_metrics", "sample_records", "source_metrics"]
