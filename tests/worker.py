"""What the scale-out tests run in subprocesses, where JAX can be given 8 CPU devices or
joined to other processes (both must happen before JAX starts, so not inside pytest).

  python -m tests.worker cli FLAGS...        ``python -m experiments.train FLAGS...``, and
      each process saves what ``fit`` returned to ``$CNNJAX_TEST_DUMP/process<i>.npz``;
      with ``$CNNJAX_TEST_SIGTERM_AT_STEP=n`` it sends itself SIGTERM in its n-th step
  python -m tests.worker parity OUT.npz      3 steps of a small BN CNN on 8 devices and on 1
  python -m tests.worker reshard SRC DST OUT.npz
      restores SRC's latest checkpoint onto this process's mesh, saves it to OUT.npz and
      writes it back to DST with params doubled and step + 1
"""
import os
import pathlib
import sys
import types

import jax
import numpy as np
import optax

from cnnjax import parallel, steps, train
from cnnjax.checkpoint import Checkpoints
from cnnjax.models import create_model
from tests.conftest import make_images, stop_at_step

IMAGE_SHAPE = (16, 16, 3)


def small_bn_model():
  """bn_cnn narrowed to compile fast: batch norm after every conv and dense layer."""
  return create_model("bn_cnn", widths=(8, 8, 16, 16), dense=(16, 16))


def abstract_state(sharding: jax.sharding.Sharding) -> steps.TrainState:
  """The TrainState of ``small_bn_model`` with Adam, as shapes with ``sharding`` (no arrays)."""
  shapes = jax.eval_shape(
      lambda: steps.create_train_state(small_bn_model(), optax.adam(1e-3), IMAGE_SHAPE, 0))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def flat(tree) -> dict[str, np.ndarray]:
  """Leaves by path, this process's copy of each (``[...]`` keys as ``/``-joined names)."""
  def name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)

  def local(x) -> np.ndarray:
    return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)
  return {name(path): local(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _dump_fit(out: pathlib.Path) -> None:
  """Wraps ``train.fit`` so each process saves the state it ends with in ``out``."""
  real_fit = train.fit

  def fit(runner, state, *args, **kwargs):
    state = real_fit(runner, state, *args, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"process{jax.process_index()}.npz", mesh_size=runner.mesh.size,
             process_count=jax.process_count(), step=int(state.step),
             **flat({"params": state.params, "batch_stats": state.batch_stats}))
    return state
  train.fit = fit


def parity(out: str) -> None:
  """Two steps on one global batch of 32, on all devices and on the first one alone.

  Two, not more: batch norm over this tiny model's 1x1 maps amplifies float32 rounding
  ~40x per step (against a float64 run of the same steps: 1e-7 after one step, 1e-5 after
  two, 5e-4 after three, on one device as on eight), so later steps compare rounding noise.
  The second step still reads the state (params, momentum) the first one left sharded.
  """
  x, y = make_images(32, shape=IMAGE_SHAPE)
  normalize = steps.make_normalize(np.zeros(3), np.full(3, 255.0))
  results = {}
  for name, devices in (("all", jax.devices()), ("one", jax.devices()[:1])):
    runner = steps.Runner.create(normalize, mesh=parallel.make_mesh(devices))
    state = runner.put_state(
        steps.create_train_state(small_bn_model(), optax.sgd(1e-3, momentum=0.9), IMAGE_SHAPE, 0))
    initial = flat(state.params)
    batch = runner.to_global({"image": x, "label": y})
    for _ in range(2):
      state, sums = runner.train_step(state, batch)
    results[f"{name}/moved"] = max(np.abs(v - initial[k]).max()
                                   for k, v in flat(state.params).items())
    results.update({f"{name}/{k}": v for k, v in flat(
        {"params": state.params, "batch_stats": state.batch_stats, "loss": sums["loss"]}).items()})
    results[f"{name}/devices"] = len(batch["image"].sharding.device_set)
    results[f"{name}/shard_rows"] = batch["image"].addressable_shards[0].data.shape[0]
    results[f"{name}/state_devices"] = len(jax.tree.leaves(state.params)[0].sharding.device_set)
  np.savez(out, **results)


def reshard(src: str, dst: str, out: str) -> None:
  """Restores ``src`` onto this process's mesh (replicated) and writes a changed copy to ``dst``."""
  sharding = parallel.replicated(parallel.make_mesh())
  source = Checkpoints(src)
  state = source.restore(source.latest_step(), abstract_state(sharding))
  source.close()
  devices = {len(x.sharding.device_set) for x in jax.tree.leaves(state)}
  np.savez(out, devices=sorted(devices), **flat(state))
  changed = state.replace(step=state.step + 1, params=jax.tree.map(lambda p: p * 2, state.params))
  target = Checkpoints(dst)
  target.save(int(changed.step), changed)
  target.wait()
  target.close()


if __name__ == "__main__":
  command, args = sys.argv[1], sys.argv[2:]
  if command == "cli":
    from experiments import train as command
    _dump_fit(pathlib.Path(os.environ["CNNJAX_TEST_DUMP"]))
    if os.environ.get("CNNJAX_TEST_SIGTERM_AT_STEP"):
      stop_at_step(types.SimpleNamespace(setattr=setattr),
                   int(os.environ["CNNJAX_TEST_SIGTERM_AT_STEP"]))
    command.cli([sys.argv[0], *args])
  elif command == "parity":
    parity(*args)
  else:
    reshard(*args)
