"""Train state, optimizer, and the sharded jitted entry points that update or score
a model: ``update(state, batch, rng) -> (state, metrics)``, gradients, log-probs.

Every entry point is ``jax.jit`` with explicit ``in_shardings``/``out_shardings``
from a ``zsjax.sharding.ShardingPlan``; the state is donated to the update. The
losses are pure functions ``loss_fn(params, batch, rng) -> (loss, metrics)``;
``next_token_loss`` (masked next-token cross-entropy, token mean) is the SFT and
benchmark loss, and the RL losses plug in the same way.

Batches are dicts of ``[B, L]`` arrays: ``tokens`` (int32), ``loss_mask`` (1 on
tokens the loss predicts), optional ``segment_ids`` (0 = padding; packed rows)
and ``positions``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from zsjax.model import ModelConfig, init_params, param_shapes, token_log_probs
from zsjax.sharding import ShardingPlan

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32, updates applied so far
  params: Any
  opt_state: Any


def learning_rate_schedule(learning_rate: float, total_steps: int, warmup_fraction: float = 0.0,
                           decay: str = "constant", cooldown: tuple[int, int] | None = None
                           ) -> optax.Schedule:
  """Linear warmup over ``warmup_fraction * total_steps`` updates, then constant or
  cosine decay to 0 at ``total_steps``. ``cooldown=(start, steps)``: the rate holds
  after the warmup and the decay spans ``steps`` updates from ``start`` instead
  (warmup-stable-decay; an sft job that stops when a check passes, ``train_sft``)."""
  if not 0.0 <= warmup_fraction <= 1.0:
    raise ValueError(f"warmup_fraction={warmup_fraction} must lie in [0, 1].")
  warmup = int(round(warmup_fraction * total_steps))
  stable, span = 0, total_steps - warmup
  if cooldown is not None:
    stable, span = max(cooldown[0] - warmup, 0), cooldown[1]
  if decay == "constant":
    after = optax.constant_schedule(learning_rate)
  elif decay == "cosine":
    after = optax.cosine_decay_schedule(learning_rate, max(span, 1))
    if stable:
      after = optax.join_schedules([optax.constant_schedule(learning_rate), after], [stable])
  else:
    raise ValueError(f"decay={decay!r} is not 'constant' or 'cosine'.")
  if warmup == 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(learning_rate / warmup, learning_rate, warmup - 1), after], [warmup])


def make_optimizer(learning_rate: float, total_steps: int, *, warmup_fraction: float = 0.0,
                   decay: str = "constant", weight_decay: float = 0.0, clip_norm: float = 1.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   cooldown: tuple[int, int] | None = None):
  """AdamW after global-norm clipping; returns ``(tx, schedule)``. The optimizer
  state's structure does not depend on the schedule (``learning_rate_schedule``)."""
  schedule = learning_rate_schedule(learning_rate, total_steps, warmup_fraction, decay, cooldown)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts), schedule


def next_token_loss(cfg: ModelConfig, params, batch: dict, rng: jax.Array | None = None):
  """Masked next-token negative log-likelihood, averaged over target tokens."""
  del rng
  logp = token_log_probs(cfg, params, batch["tokens"], batch.get("segment_ids"),
                         batch.get("positions"))  # [B, L]
  mask = batch["loss_mask"].astype(jnp.float32)  # [B, L]
  count = jnp.sum(mask)
  loss = -jnp.sum(logp * mask) / jnp.maximum(count, 1.0)
  return loss, {"loss/nll": loss, "data/target_tokens": count}


def init_state(cfg: ModelConfig, tx, rng: jax.Array, head: str = "lm") -> TrainState:
  params = init_params(cfg, rng, head)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(cfg: ModelConfig, tx, plan: ShardingPlan, head: str = "lm") -> TrainState:
  """NamedSharding tree of a ``TrainState`` (params by the plan's rules, optimizer
  moments like their params, step replicated)."""
  params = plan.params(cfg, head)
  return TrainState(step=plan.replicated(), params=params,
                    opt_state=plan.opt_state(tx, param_shapes(cfg, head), params))


def create_train_state(cfg: ModelConfig, tx, plan: ShardingPlan, *, rng: jax.Array | None = None,
                       params=None, head: str = "lm") -> tuple[TrainState, TrainState]:
  """A sharded ``TrainState`` and its shardings, built shape-first: every array is
  created directly on its shards (from ``rng``, or from given ``params``)."""
  shardings = state_shardings(cfg, tx, plan, head)
  if params is None:
    if rng is None:
      raise ValueError("create_train_state needs rng (random init) or params (e.g. from hf).")
    init = jax.jit(functools.partial(init_state, cfg, tx, head=head), out_shardings=shardings)
    return init(rng), shardings
  params = jax.device_put(params, shardings.params)
  opt_state = jax.jit(tx.init, in_shardings=(shardings.params,),
                      out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state), shardings


def make_update_step(loss_fn: LossFn, tx, plan: ShardingPlan, shardings: TrainState,
                     batch_shardings, schedule: optax.Schedule | None = None):
  """``update(state, batch, rng) -> (state, metrics)``, jitted and sharded, state
  donated. The step's rng is ``fold_in(rng, state.step)``."""

  def update(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    with plan.context():
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss/total": loss, "optim/grad_norm": optax.global_norm(grads),
               "optim/update_norm": optax.global_norm(updates)}
    if schedule is not None:
      metrics["optim/lr"] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(update, in_shardings=(shardings, batch_shardings, plan.replicated()),
                 out_shardings=(shardings, plan.replicated()), donate_argnums=(0,))


def make_grad_fn(loss_fn: LossFn, plan: ShardingPlan, param_shardings, batch_shardings):
  """``grads(params, batch, rng) -> ((loss, metrics), grads)``, jitted and sharded;
  gradients come back laid out like the params."""
  def grads(params, batch, rng):
    with plan.context():
      return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)

  return jax.jit(grads, in_shardings=(param_shardings, batch_shardings, plan.replicated()),
                 out_shardings=((plan.replicated(), plan.replicated()), param_shardings))


def make_log_prob_fn(cfg: ModelConfig, plan: ShardingPlan, param_shardings, batch_size: int,
                     length: int):
  """``log_probs(params, tokens, segment_ids) -> [B, L]`` (``zsjax.model.token_log_probs``),
  jitted with batch-sharded inputs and output."""
  spec = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
  row = plan.batch(spec)

  def log_probs(params, tokens, segment_ids):
    with plan.context():
      return token_log_probs(cfg, params, tokens, segment_ids)

  return jax.jit(log_probs, in_shardings=(param_shardings, row, row), out_shardings=row)


def split_rows(tree, chunks: int, plan: ShardingPlan):
  """``[N, ...] -> [chunks, N / chunks, ...]``, chunk c holding rows c, c + chunks,
  ...: every device keeps a share of every chunk (no resharding)."""
  def one(x):
    x = x.reshape((x.shape[0] // chunks, chunks) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, plan.rows(x.ndim, axis=1))
  return jax.tree_util.tree_map(one, tree)


def join_rows(x: jax.Array) -> jax.Array:
  """The inverse of ``split_rows`` for one array."""
  return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


def make_chunked_score_fn(score_fn, plan: ShardingPlan, param_shardings, chunk_rows: int):
  """``score(params, tokens, segment_ids) -> [N, L]``, jitted and row-sharded, running
  ``score_fn(params, tokens, segment_ids)`` on ``chunk_rows`` rows at a time
  (``lax.map``) so activation memory stays that of one chunk."""
  row2 = plan.rows(2)

  def score(params, tokens, segment_ids):
    chunks = max(tokens.shape[0] // chunk_rows, 1)
    with plan.context():
      parts = split_rows((tokens, segment_ids), chunks, plan)
      return join_rows(jax.lax.map(lambda p: score_fn(params, *p), parts))

  return jax.jit(score, in_shardings=(param_shardings, row2, row2), out_shardings=row2)


def make_accumulating_update(loss_fn, tx, plan: ShardingPlan, shardings: TrainState,
                             batch_shardings, micro_batch_size: int | None = None,
                             aggregation: str = "token_mean", schedule=None, prefix: str = ""):
  """``update(state, batch, rng) -> (state, metrics)`` over one (mini)batch, jitted
  with the state donated, for a loss ``loss_fn(params, micro_batch, normalizer, rng)
  -> (loss, metrics)`` that sums over its tokens and divides by ``normalizer``.

  The batch is split into micro-batches of ``micro_batch_size`` rows (None: one);
  their gradients, losses and metrics
  are summed with the normalizer of the *whole* batch (its ``loss_mask`` token
  count, or for ``seq_mean_token_mean`` its sequence count), so the result equals
  one pass over the batch. An update whose loss or gradient norm is not finite is
  not applied: the state comes back unchanged and ``{prefix}optim/skipped`` is 1."""

  def update(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    mask = (batch["loss_mask"] if isinstance(batch, dict) else batch.loss_mask)
    mask = mask.astype(jnp.float32)  # [B, L]
    if aggregation == "token_mean":
      normalizer = jnp.maximum(mask.sum(), 1.0)
    else:
      normalizer = jnp.maximum((mask.sum(axis=1) > 0).sum().astype(jnp.float32), 1.0)
    rows = mask.shape[0]
    if micro_batch_size and rows % micro_batch_size:
      raise ValueError(f"a batch of {rows} rows does not split into micro-batches of "
                       f"{micro_batch_size}; use a micro-batch size that divides it.")
    micro = split_rows(batch, rows // (micro_batch_size or rows), plan)  # [k, B / k, ...]

    def grads_of(micro_batch):
      with plan.context():
        return jax.value_and_grad(loss_fn, has_aux=True)(state.params, micro_batch, normalizer,
                                                         rng)

    def body(total, micro_batch):
      return jax.tree_util.tree_map(jnp.add, total, grads_of(micro_batch)), None

    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                   jax.eval_shape(grads_of, first))
    summed, _ = jax.lax.scan(body, zeros, micro)
    return _apply_summed(tx, state, summed, schedule, prefix)

  return jax.jit(update, in_shardings=(shardings, batch_shardings, plan.replicated()),
                 out_shardings=(shardings, plan.replicated()), donate_argnums=(0,))


def _apply_summed(tx, state: TrainState, summed, schedule, prefix: str):
  """One optimizer step from the summed ``((loss, metrics), grads)`` of a batch's
  micro-batches; skipped (state unchanged, ``optim/skipped`` 1) when the loss or the
  gradient norm is not finite."""
  (loss, metrics), grads = summed
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
  new = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, state)
  metrics = {**metrics, f"{prefix}loss/total": loss, f"{prefix}optim/grad_norm": grad_norm,
             f"{prefix}optim/update_norm": optax.global_norm(updates),
             f"{prefix}optim/skipped": 1.0 - ok.astype(jnp.float32)}
  if schedule is not None:
    metrics[f"{prefix}optim/lr"] = schedule(state.step)
  return new, metrics


def make_packed_update(loss_fn, tx, plan: ShardingPlan, shardings: TrainState,
                       micro_shardings, schedule=None, prefix: str = ""):
  """``update(state, micro_batches, normalizer, rng) -> (state, metrics)`` for a
  batch given as a list of micro-batches of one shape (packed rows,
  ``zsjax.packing``: how many depends on the batch's real tokens). Each
  micro-batch's ``((loss, metrics), grads)`` comes from one jitted program and is
  summed; one jitted step applies the sum (``make_accumulating_update``'s step,
  the state donated). ``normalizer`` is the whole batch's (its token count, or its
  sequence count for per-sequence weights folded into ``loss_mask``), so the
  result equals one pass over the batch."""
  repl = plan.replicated()

  def grads_of(params, micro_batch, normalizer, rng):
    with plan.context():
      return jax.value_and_grad(loss_fn, has_aux=True)(params, micro_batch, normalizer, rng)

  grad_fn = jax.jit(grads_of, in_shardings=(shardings.params, micro_shardings, repl, repl))
  add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b), donate_argnums=(0,))
  apply = jax.jit(functools.partial(_apply_summed, tx, schedule=schedule, prefix=prefix),
                  out_shardings=(shardings, repl), donate_argnums=(0,))

  def update(state: TrainState, micro_batches, normalizer, rng):
    if not micro_batches:
      raise ValueError("a packed update needs at least one micro-batch.")
    normalizer = jnp.float32(max(float(normalizer), 1.0))
    rng = jax.random.fold_in(rng, state.step)
    summed = None
    for micro in micro_batches:
      out = grad_fn(state.params, micro, normalizer, rng)
      summed = out if summed is None else add(summed, out)
    return apply(state, summed)

  return update
