"""Optimizers and learning-rate schedules from a config, by name, through optax."""
from typing import Any

import jax
import optax

from cnnjax.errors import UserError

SCHEDULES = ("constant", "one_cycle", "warmup_cosine")
OPTIMIZERS = ("sgd", "rmsprop", "adam", "adamw")


def make_schedule(cfg: Any, lr: float, total_steps: int) -> optax.Schedule:
  """The learning rate per step.

  Args:
    cfg: the ``schedule`` config: ``name`` in SCHEDULES; for 'one_cycle' ``anneal``
      ('cos' or 'linear'), ``pct_start``, ``div_factor``, ``final_div_factor`` (the
      meanings of ``torch.optim.lr_scheduler.OneCycleLR``); for 'warmup_cosine'
      ``warmup_steps`` and ``end_lr``.
    lr: the base (constant) or peak (one-cycle, warmup-cosine) learning rate.
    total_steps: optimizer steps in the whole run.
  """
  if cfg.name == "constant":
    return optax.constant_schedule(lr)
  if cfg.name == "one_cycle":
    make = {"cos": optax.cosine_onecycle_schedule, "linear": optax.linear_onecycle_schedule}
    if cfg.anneal not in make:
      raise UserError(f"unknown schedule.anneal {cfg.anneal!r}; expected 'cos' or 'linear'")
    return make[cfg.anneal](total_steps, lr, pct_start=cfg.pct_start, div_factor=cfg.div_factor,
                            final_div_factor=cfg.final_div_factor)
  if cfg.name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, cfg.warmup_steps, total_steps, cfg.end_lr)
  raise UserError(f"unknown schedule {cfg.name!r}; expected one of {list(SCHEDULES)}")


def decay_mask(params: Any) -> Any:
  """True for weights that take weight decay: kernels, not biases or BN scales/offsets."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimizer named ``cfg.name`` (one of OPTIMIZERS) driven by ``schedule``.

  ``cfg.weight_decay`` is decoupled for 'adamw' and added to the gradient (L2, as
  ``torch.optim`` does) for the others; either way it is masked off biases and batch
  norm parameters. RMSprop keeps eps outside the square root as Keras and PyTorch do.
  """
  if cfg.name not in OPTIMIZERS:
    raise UserError(f"unknown optimizer {cfg.name!r}; expected one of {list(OPTIMIZERS)}")
  if cfg.name == "adamw":
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.name == "sgd":
    opt = optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
  elif cfg.name == "rmsprop":
    opt = optax.rmsprop(schedule, decay=cfg.rho, eps=cfg.eps, eps_in_sqrt=False,
                        momentum=cfg.momentum or None)
  else:
    opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.weight_decay:
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask), opt)
  return opt
