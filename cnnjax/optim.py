"""Optimizers and learning-rate schedules from a config, by name, through optax; freezing
and per-group learning rates from rules over parameter paths (``optax.partition`` labels),
and the frozen modules run in inference mode (``frozen_inference``)."""
import contextlib
import functools
import re
from collections.abc import Iterator
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from cnnjax.errors import UserError
from cnnjax.models import batch_norm

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
    if cfg.anneal == "cos":
      return optax.cosine_onecycle_schedule(total_steps, lr, pct_start=cfg.pct_start,
                                            div_factor=cfg.div_factor,
                                            final_div_factor=cfg.final_div_factor)
    if cfg.anneal == "linear":  # torch's two phases (optax's linear_onecycle has fastai's three)
      start, end = lr / cfg.div_factor, lr / cfg.div_factor / cfg.final_div_factor
      warm = int(cfg.pct_start * total_steps)
      return optax.join_schedules([optax.linear_schedule(start, lr, warm),
                                   optax.linear_schedule(lr, end, total_steps - warm)], [warm])
    raise UserError(f"unknown schedule.anneal {cfg.anneal!r}; expected 'cos' or 'linear'")
  if cfg.name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, cfg.warmup_steps, total_steps, cfg.end_lr)
  raise UserError(f"unknown schedule {cfg.name!r}; expected one of {list(SCHEDULES)}")


@functools.lru_cache(maxsize=4)
def schedule_values(schedule: optax.Schedule, num_steps: int) -> np.ndarray:
  """``[num_steps]`` the rates of steps ``0 .. num_steps - 1`` on the host (read-only), in
  one compiled call (eagerly, each of the schedule's operations would compile on its own),
  once per schedule."""
  rates = np.asarray(jax.jit(lambda: jax.vmap(schedule)(jnp.arange(num_steps)))())
  rates.flags.writeable = False
  return rates


def decay_mask(params: Any) -> Any:
  """True for weights that take weight decay: kernels, not biases or BN scales/offsets."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


FROZEN = "frozen"
_LISTED = 8  # parameter paths named in an error message


def _parse_rule(rule: str) -> tuple[re.Pattern, str, float]:
  """``'backbone/.*:0.1'`` -> (compiled regex, group label, lr multiplier; 0 if frozen)."""
  pattern, sep, value = str(rule).rpartition(":")
  expected = ("expected 'regex:frozen' or 'regex:<lr multiplier>', e.g. 'backbone/.*:frozen' "
              "or 'head/.*:1.0'")
  if not sep or not pattern:
    raise UserError(f"optimizer.groups rule {rule!r} has no 'regex:value' form; {expected}")
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise UserError(f"optimizer.groups rule {rule!r} has a bad regex ({e}); {expected}") from None
  if value == FROZEN:
    return regex, FROZEN, 0.0
  try:
    scale = float(value)
  except ValueError:
    scale = -1.0
  if not scale > 0:
    raise UserError(f"optimizer.groups rule {rule!r} has value {value!r}; {expected} (> 0)")
  return regex, f"lr*{scale:g}", scale


def _listed(paths: Sequence[str]) -> str:
  more = f", ... and {len(paths) - _LISTED} more" if len(paths) > _LISTED else ""
  return ", ".join(paths[:_LISTED]) + more


def group_labels(params: Any, groups: Sequence[str]) -> Any:
  """Each parameter's group label (``'frozen'`` or ``'lr*<multiplier>'``), a tree like ``params``.

  Args:
    params: the model's parameters (nested dicts).
    groups: rules ``'regex:frozen'`` or ``'regex:<lr multiplier>'``; a regex must match a
      whole parameter path (``'backbone/layer4_1/conv2/kernel'``).
  Raises:
    UserError: a rule is malformed or matches no parameter, or a parameter matches no rule
      or several (all of them listed).
  """
  rules = [(rule, *_parse_rule(rule)) for rule in groups]
  flat = traverse_util.flatten_dict(params, sep="/")
  labels, unmatched, ambiguous = {}, [], []
  used = set()
  for path in flat:
    hits = [(rule, label) for rule, regex, label, _ in rules if regex.fullmatch(path)]
    used.update(rule for rule, _ in hits)
    if len(hits) == 1:
      labels[path] = hits[0][1]
    elif hits:
      ambiguous.append(f"{path} ({' and '.join(repr(rule) for rule, _ in hits)})")
    else:
      unmatched.append(path)
  if unmatched or ambiguous:
    problems = [f"{len(unmatched)} match no rule: {_listed(unmatched)}"] if unmatched else []
    problems += [f"{len(ambiguous)} match several: {_listed(ambiguous)}"] if ambiguous else []
    raise UserError(f"optimizer.groups {tuple(groups)}: of the {len(flat)} parameters, "
                    f"{'; '.join(problems)}; expected each to match exactly one rule")
  for rule, *_ in rules:
    if rule not in used:
      raise UserError(f"optimizer.groups rule {rule!r} matches no parameter; expected a regex "
                      f"over whole parameter paths such as {next(iter(flat))!r}")
  return traverse_util.unflatten_dict(labels, sep="/")


def frozen_modules(params: Any, groups: Sequence[str]) -> frozenset[tuple[str, ...]]:
  """Paths of the modules, at any depth, whose parameters the rules all freeze
  (``('backbone',)``, ``('backbone', 'layer1_0', 'bn1')``, ...); empty without rules."""
  if not groups:
    return frozenset()
  frozen, trained = set(), set()
  for path, label in traverse_util.flatten_dict(group_labels(params, groups)).items():
    prefixes = {path[:i] for i in range(1, len(path))}
    (frozen if label == FROZEN else trained).update(prefixes)
  return frozenset(frozen - trained)


def make_optimizer(cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimizer named ``cfg.name`` (one of OPTIMIZERS) driven by ``schedule``.

  ``cfg.weight_decay`` is decoupled for 'adamw' and added to the gradient (L2, as
  ``torch.optim`` does) for the others; either way it is masked off biases and batch
  norm parameters. RMSprop keeps eps outside the square root as Keras and PyTorch do.

  With rules in ``cfg.groups`` (see ``group_labels``) the parameters are partitioned
  (``optax.partition``): a frozen group gets zero updates and keeps no optimizer state
  (``optax.set_to_zero``); any other group its own optimizer at ``multiplier * schedule``.
  """
  groups = tuple(cfg.groups)
  if not groups:
    return _optimizer(cfg, schedule)
  transforms = {FROZEN: optax.set_to_zero()}
  for rule in groups:
    _, label, scale = _parse_rule(rule)
    if label != FROZEN:
      transforms[label] = _optimizer(cfg, lambda step, scale=scale: scale * schedule(step))
  return optax.partition(transforms, lambda params: group_labels(params, groups))


def _optimizer(cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """``make_optimizer`` for a single group of parameters."""
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


@contextlib.contextmanager
def frozen_inference(frozen: frozenset[tuple[str, ...]]) -> Iterator[None]:
  """A context in which the modules at the paths in ``frozen`` (see
  ``optim.frozen_modules``) and their submodules run in inference mode even when the model
  is called with ``train=True``: their ``BatchNorm`` layers use and keep their running
  statistics (folded into their convolutions where the model calls ``batch_norm.conv_norm``:
  ResNet, EfficientNet-Lite, VGG-BN), their ``Dropout``
  layers pass inputs through. Wrap the ``apply`` (or the traced step) in it."""
  if not frozen:
    yield
    return

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, (nn.BatchNorm, nn.Dropout))
        and batch_norm.is_under(tuple(module.path), frozen)):
      if isinstance(module, nn.Dropout):
        return args[0]
      if not module.use_running_average:
        return module.clone(parent=None, use_running_average=True).apply(
            module.variables, *args, **kwargs)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(intercept), batch_norm.inference_under(frozen):
    yield
