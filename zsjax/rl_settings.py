"""The RL job's settings, read from the config once and checked before any work.

``check_config(config) -> RLSettings`` checks every section the RL job reads
(``rl``, ``engine``, ``rollout.dtype``, ``sampling.method``,
``simulator.sampling_method``, ``checkpoint``), naming the field, the value and
the fix, and returns ``config.rl`` as a frozen, typed ``RLSettings``: what
``zsjax.rl_step`` builds its programs from (``RLPrograms.settings``).
"""

from __future__ import annotations

import dataclasses

import jax

from zsjax import rewards, rl
from zsjax.checkpoint import check_checkpoint_config
from zsjax.model import check_compute_dtype
from zsjax.sampling import check_method
from zsjax.search import check_engine_config
from zsjax.template import prompt_style

LOSS_MASKS = ("policy", "response")
HOST_MEMORY = "pinned_host"  # the JAX memory kind offloaded arrays live in


@dataclasses.dataclass(frozen=True)
class RLSettings:
  """``config.rl`` (configs/zerosearch.py documents each field; METHOD.md §7)."""

  algorithm: str  # reinforce | grpo | ppo
  reward: str  # a key of rewards.TRAIN_REWARDS
  prompts_per_step: int
  samples_per_prompt: int
  total_steps: int
  epochs: int
  minibatch_size: int  # trajectories per update (the last of an epoch may be smaller)
  micro_batch_size: int  # trajectories per accumulated gradient
  score_batch_size: int  # trajectories per chunk of the scoring pass
  learning_rate: float
  warmup_fraction: float
  decay: str
  weight_decay: float
  grad_clip: float
  clip_eps: float
  dual_clip: float  # 0 = off
  kl_coef: float
  kl_type: str
  entropy_coef: float
  aggregation: str
  loss_mask: str  # policy | response
  critic_learning_rate: float
  critic_warmup_fraction: float
  value_clip: float
  gamma: float
  lam: float
  sample_every: int
  sample_rows: int
  scoring_dtype: str  # "" = the policy's
  # the steps the learning-rate and noise schedules span; 0 = total_steps. A resumed
  # run keeps its recorded horizon (zsjax.workdir): set it to run longer on the same
  # schedules (their end values hold past it)
  schedule_steps: int = 0
  # memory options (zsjax.rl_step; experiments/plan_rl.py counts them): the frozen
  # reference's dtype ("" = the policy's param dtype; "bfloat16" halves it), and the
  # reference and the optimizer state kept in host memory between the phases that
  # use them (JAX memory kinds: "pinned_host")
  # padding-free scoring and update (zsjax.packing): trajectories packed into rows of
  # this many tokens (>= rollout.max_length); 0: padded rows of rollout.max_length
  pack_tokens: int = 0
  # False: no scoring pass for the old log-probs where a step makes one update (epochs
  # 1, one minibatch; REINFORCE or GRPO): the update's own log-probs, stop-gradient,
  # stand in for them. On-policy the ratio is 1 and the gradient the same either way
  # (with a scoring_dtype other than the policy's the pass adds that dtype's rounding
  # to the ratio; without it the gradient is the exact on-policy one); the step saves
  # one forward pass over its tokens (the reference's pass stays)
  old_logp_pass: bool = True
  reference_dtype: str = ""
  offload_reference: bool = False
  offload_optimizer: bool = False

  @classmethod
  def from_config(cls, section) -> "RLSettings":
    """From a ``config.rl`` section (ConfigDict or dict); a missing field is named."""
    required = [f for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    missing = [f.name for f in required if f.name not in section]
    if missing:
      raise ValueError(f"config.rl lacks {missing}; configs/zerosearch.py shows every field "
                       "with its default.")
    return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)
                  if f.name in section})

  @property
  def horizon(self) -> int:
    """The steps the learning-rate schedule and the noise curriculum span."""
    return self.schedule_steps or self.total_steps

  @property
  def rows(self) -> int:
    """Trajectories a step: prompts_per_step x samples_per_prompt."""
    return self.prompts_per_step * self.samples_per_prompt

  @property
  def loss_kl_coef(self) -> float:
    """The KL coefficient of the policy loss: 0 where the KL sits in the reward
    (``rl.kl_in_reward``: PPO)."""
    return 0.0 if rl.kl_in_reward(self.algorithm) else self.kl_coef

  def check(self) -> "RLSettings":
    """Fails naming the field, the value and the fix; returns ``self``."""
    if self.algorithm not in rl.ALGORITHMS:
      raise ValueError(f"config.rl.algorithm={self.algorithm!r} is not one of {rl.ALGORITHMS}.")
    if self.reward not in rewards.TRAIN_REWARDS:
      raise ValueError(f"config.rl.reward={self.reward!r} is not one of "
                       f"{sorted(rewards.TRAIN_REWARDS)}.")
    if self.loss_mask not in LOSS_MASKS:
      raise ValueError(f"config.rl.loss_mask={self.loss_mask!r}: use 'policy' (only sampled "
                       "tokens, the method) or 'response' (inserted documents too, the ablation).")
    check_compute_dtype(self.scoring_dtype, "config.rl.scoring_dtype")
    check_compute_dtype(self.reference_dtype, "config.rl.reference_dtype")
    # Checked here, before the models are built and a rollout is done (rl.py checks
    # them again where they are used).
    if self.kl_type not in rl.KL_TYPES:
      raise ValueError(f"config.rl.kl_type={self.kl_type!r} is not one of {rl.KL_TYPES} "
                       "(k3, the low-variance estimator, is the reference's).")
    if self.aggregation not in rl.AGGREGATIONS:
      raise ValueError(f"config.rl.aggregation={self.aggregation!r} is not one of "
                       f"{rl.AGGREGATIONS} (token_mean is the reference's).")
    # kl_coef may be negative: -0.001 is the ZeroSearch code's sign (docs/fidelity.md)
    for name in ("entropy_coef", "weight_decay", "grad_clip", "clip_eps", "dual_clip",
                 "value_clip"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"config.rl.{name}={getattr(self, name)} must be >= 0 (a negative "
                         "coefficient would reward what it is meant to penalise; 0 turns "
                         "the term off).")
    if self.dual_clip and self.dual_clip <= 1.0:
      raise ValueError(f"config.rl.dual_clip={self.dual_clip} must be > 1 (the paper: 3) or 0 "
                       "(off).")
    if self.schedule_steps < 0:
      raise ValueError(f"config.rl.schedule_steps={self.schedule_steps} must be >= 0 (0: the "
                       "schedules span config.rl.total_steps).")
    for name in ("prompts_per_step", "samples_per_prompt", "total_steps", "epochs"):
      if getattr(self, name) <= 0:
        raise ValueError(f"config.rl.{name}={getattr(self, name)} must be a positive integer.")
    for name in ("learning_rate",) + (("critic_learning_rate",) if self.algorithm == "ppo" else ()):
      if not getattr(self, name) > 0:
        raise ValueError(f"config.rl.{name}={getattr(self, name)} must be > 0 (a negative rate "
                         "would climb the loss); the paper uses 1e-6 for the policy.")
    if not 0 <= self.warmup_fraction < 1:
      raise ValueError(f"config.rl.warmup_fraction={self.warmup_fraction} must lie in [0, 1).")
    self._check_batches()
    self.check_old_logp_pass()
    if self.algorithm == "grpo" and self.samples_per_prompt < 2:
      raise ValueError(f"config.rl.samples_per_prompt={self.samples_per_prompt}: GRPO needs "
                       "groups of at least 2 samples per prompt.")
    return self

  def _check_batches(self) -> None:
    n, m, micro = self.rows, self.minibatch_size, self.micro_batch_size
    if not 0 < m <= n:
      raise ValueError(f"config.rl.minibatch_size={m} must lie in [1, {n}] (the "
                       f"trajectories of a step, prompts_per_step x samples_per_prompt = "
                       f"{self.prompts_per_step} x {self.samples_per_prompt}).")
    last = n % m  # an epoch's last, smaller minibatch (0: none)
    divisors = [d for d in range(1, m + 1) if m % d == 0 and last % d == 0]
    if micro <= 0:
      raise ValueError(f"config.rl.micro_batch_size={micro} must be a positive integer.")
    if m % micro:
      fits = [k for k in range(micro, n + 1, micro) if n % k == 0]
      raise ValueError(
          f"config.rl.minibatch_size={m} is not a multiple of config.rl.micro_batch_size="
          f"{micro} (a minibatch is accumulated from whole micro-batches). Use a "
          f"minibatch_size of {' or '.join(map(str, fits)) or 'a multiple of it'} (multiples of "
          f"{micro} that divide the {n} trajectories of a step), or a micro_batch_size that "
          f"divides {m}.")
    if last % micro:
      raise ValueError(
          f"config.rl.minibatch_size={m} does not divide the {n} trajectories "
          f"of a step ({self.prompts_per_step} x {self.samples_per_prompt}): the last minibatch "
          f"holds {last}, which config.rl.micro_batch_size={micro} does not "
          f"divide. Use a minibatch_size that divides {n}, or a micro_batch_size of "
          f"{divisors[-1]} (or another divisor of both {m} and {last}).")
    if self.score_batch_size <= 0 or n % self.score_batch_size:
      raise ValueError(f"config.rl.score_batch_size={self.score_batch_size} must divide the {n} "
                       "trajectories of a step.")

  def check_old_logp_pass(self) -> None:
    """``old_logp_pass=False`` only where the old log-probs are the update's own."""
    if self.old_logp_pass is True:
      return
    if self.old_logp_pass is not False:
      raise ValueError(f"config.rl.old_logp_pass={self.old_logp_pass!r} must be True or False.")
    updates = self.epochs * -(-self.rows // self.minibatch_size)
    if self.algorithm == "ppo":
      raise ValueError("config.rl.old_logp_pass=False: PPO reads the old log-probs before its "
                       "update (its KL is in the reward); set config.rl.old_logp_pass=True.")
    if updates != 1:
      raise ValueError(
          f"config.rl.old_logp_pass=False needs one update a step (then the old log-probs "
          f"are the update's own), but epochs={self.epochs} with minibatch_size="
          f"{self.minibatch_size} of the {self.rows} trajectories of a step make {updates}. "
          f"Set config.rl.old_logp_pass=True, or epochs=1 and minibatch_size={self.rows}.")

  def check_memory(self, devices) -> None:
    """Host offload needs a backend with a ``pinned_host`` memory (GPU, TPU and CPU
    in current JAX): elsewhere an error naming the fields to turn off."""
    fields = [f"config.rl.{name}=True" for name in ("offload_reference", "offload_optimizer")
              if getattr(self, name)]
    if not fields:
      return
    device = next((d for d in devices if d.process_index == jax.process_index()), devices[0])
    kinds = sorted(m.kind for m in device.addressable_memories())
    if HOST_MEMORY not in kinds:
      raise ValueError(f"{' and '.join(fields)} keep arrays in host memory, but this backend "
                       f"({device.platform}) has no {HOST_MEMORY!r} memory (it has {kinds}); "
                       "set them to False, or plan the run without offload "
                       "(experiments/plan_rl.py).")

  def check_mesh(self, plan) -> None:
    """Every batch the job shards splits evenly over data x fsdp."""
    sizes = (self.rows, self.micro_batch_size, self.score_batch_size)
    if any(n % plan.batch_divisor for n in sizes):
      raise ValueError(
          f"config.rl: trajectories per step ({self.rows}), micro_batch_size "
          f"({self.micro_batch_size}) and score_batch_size ({self.score_batch_size}) must be "
          f"multiples of data x fsdp = {plan.batch_divisor} (mesh {plan.sizes}).")


def check_config(config) -> RLSettings:
  """Checks every section the RL job reads before any work; returns the settings."""
  settings = RLSettings.from_config(config.rl).check()
  check_engine_config(config.engine)
  check_compute_dtype(config.rollout.dtype, "config.rollout.dtype")
  check_method(config.sampling.method, "config.sampling.method")
  check_method(config.simulator.sampling_method, "config.simulator.sampling_method")
  if not 0.0 < config.simulator.top_p <= 1.0:
    raise ValueError(f"config.simulator.top_p={config.simulator.top_p} must lie in (0, 1] "
                     "(1.0: no nucleus truncation, what the reference's simulator server uses).")
  check_checkpoint_config(config.checkpoint)
  prompt_style(config.data.prompt_style)
  if not config.data.limit >= 0:
    raise ValueError(f"config.data.limit={config.data.limit} must be >= 0: the first N training "
                     "rows of each file, or 0 for all of them.")
  check_waves(config.rollout.waves, settings)
  if not isinstance(settings.pack_tokens, int) or settings.pack_tokens < 0 or (
      settings.pack_tokens and settings.pack_tokens < config.rollout.max_length):
    raise ValueError(f"config.rl.pack_tokens={settings.pack_tokens!r} must be 0 (padded rows) "
                     f"or at least config.rollout.max_length={config.rollout.max_length} (a "
                     "packed row holds whole trajectories).")
  return settings


def check_waves(waves, settings: RLSettings, plan=None) -> None:
  """``config.rollout.waves``: a whole number of prompts per wave, and (with
  ``plan``) a wave's rows split evenly over data x fsdp."""
  p, n = settings.prompts_per_step, settings.samples_per_prompt
  if not isinstance(waves, int) or waves < 1 or p % waves:
    fits = [k for k in range(1, p + 1) if p % k == 0]
    raise ValueError(f"config.rollout.waves={waves!r} must be a whole number >= 1 that divides "
                     f"config.rl.prompts_per_step={p} (each wave rolls out whole prompts); "
                     f"use one of {fits}.")
  if plan is not None and (p // waves * n) % plan.batch_divisor:
    raise ValueError(f"config.rollout.waves={waves}: a wave of {p // waves} prompts x {n} "
                     f"samples = {p // waves * n} rows does not split over data x fsdp = "
                     f"{plan.batch_divisor} (mesh {plan.sizes}); use fewer waves.")


__all__ = ["RLSettings", "LOSS_MASKS", "check_config"]
