"""Checkpointer on a tiny hand-made state: bad checkpoints are detected, moved aside
and saved again; max_to_keep is validated; a full disk is one line."""

import errno
import logging
import os
import shutil
import subprocess

import chex
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from scanformer_jax import checkpointing
from scanformer_jax.errors import UserError
from scanformer_jax.config import CheckpointConfig
from scanformer_jax.train_state import TrainState

TX = optax.adam(1e-3)
CFG = CheckpointConfig(max_to_keep=3, async_save=True)


def _state(step: int) -> TrainState:
  params = {"w": jnp.full((4, 8), float(step)), "b": jnp.arange(8, dtype=jnp.float32)}
  return TrainState(step=jnp.int32(step), params=params, opt_state=TX.init(params),
                    rng=jax.random.PRNGKey(step), skipped=jnp.int32(0))


def _data():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _abstract_and_shardings():
  state = _state(0)
  return (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
          jax.tree.map(lambda x: x.sharding, state))


def _save_steps(directory, steps, cfg=CFG):
  ckpt = checkpointing.Checkpointer(str(directory), cfg)
  for step in steps:
    ckpt.save(_state(step), _data())
  ckpt.close()


def _restore(directory, read_only=False):
  ckpt = checkpointing.Checkpointer(str(directory), CFG, read_only=read_only)
  state = ckpt.restore_latest(*_abstract_and_shardings(), _data())
  return ckpt, state


def _step_dirs(directory):
  return sorted(os.listdir(directory))


def _array_files(step_dir, item="params"):
  """The data chunks (files in `d/` folders) of one item of a checkpoint."""
  files = [os.path.join(root, n) for root, _, names in os.walk(os.path.join(step_dir, item))
           if os.path.basename(root) == "d" for n in names]
  assert files, f"no array files under {step_dir}/{item}"
  return files


def _break_remove_params(step_dir):
  shutil.rmtree(os.path.join(step_dir, "params"))


def _break_data_json(step_dir):
  with open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w") as f:
    f.write("not json {")


def _break_garbage_arrays(step_dir):
  for path in _array_files(step_dir):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.write(b"\x00garbage" * (size // 8 + 1))


@pytest.mark.parametrize("breaker", [_break_remove_params, _break_data_json,
                                     _break_garbage_arrays])
def test_corrupt_latest_is_moved_aside_and_saved_again(tmp_path, breaker, caplog):
  _save_steps(tmp_path, [2, 4])
  breaker(str(tmp_path / "4"))
  with caplog.at_level(logging.WARNING):
    ckpt, state = _restore(tmp_path)
  assert int(state.step) == 2
  assert "moved checkpoint step 4 aside" in caplog.text
  aside = [d for d in _step_dirs(tmp_path) if d.startswith("4.corrupt-")]
  assert len(aside) == 1, _step_dirs(tmp_path)  # Kept, not deleted.
  assert ckpt.all_steps() == [2]
  ckpt.save(_state(4), _data())  # The retrained step is saved again...
  ckpt.close()
  ckpt, state = _restore(tmp_path)  # ...and the next resume uses it.
  ckpt.close()
  assert int(state.step) == 4
  np.testing.assert_array_equal(state.params["w"], np.full((4, 8), 4.0))


def test_stray_empty_step_directory_is_moved_aside(tmp_path):
  _save_steps(tmp_path, [2])
  os.makedirs(tmp_path / "6")
  ckpt, state = _restore(tmp_path)
  assert int(state.step) == 2
  ckpt.save(_state(6), _data())
  ckpt.close()
  ckpt, state = _restore(tmp_path)
  ckpt.close()
  assert int(state.step) == 6


def test_save_replaces_an_existing_step_it_did_not_resume_from(tmp_path):
  _save_steps(tmp_path, [2])
  ckpt = checkpointing.Checkpointer(str(tmp_path), CFG)
  stale = _state(2).replace(params={"w": jnp.zeros((4, 8)), "b": jnp.zeros((8,))})
  ckpt.save(stale, _data())
  ckpt.close()
  assert any(d.startswith("2.corrupt-") for d in _step_dirs(tmp_path))
  ckpt, state = _restore(tmp_path)
  ckpt.close()
  np.testing.assert_array_equal(state.params["w"], np.zeros((4, 8)))


def _replace_params(step_dir, params):
  """Swaps a checkpoint's params item for a readable one holding other values: the
  same-size garbage case (files decode fine, the numbers are wrong)."""
  other = os.path.join(os.path.dirname(step_dir), "other_params")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(other, params)
  shutil.rmtree(os.path.join(step_dir, "params"))
  os.rename(other, os.path.join(step_dir, "params"))


@pytest.mark.parametrize("value", [np.nan, np.inf, 1.95e38, 3.0])
def test_same_size_garbage_in_arrays_is_caught(tmp_path, value, caplog):
  """NaN / inf (non-finite check), huge and plausible finite values (checksums)."""
  _save_steps(tmp_path, [2, 4])
  params = _state(4).params
  _replace_params(str(tmp_path / "4"), {**params, "w": params["w"].at[1, 2].set(value)})
  with caplog.at_level(logging.WARNING):
    ckpt, state = _restore(tmp_path)
  ckpt.close()
  assert int(state.step) == 2
  expected = "checksum mismatch" if np.isfinite(value) else "non-finite"
  assert expected in caplog.text
  ckpt = checkpointing.Checkpointer(str(tmp_path), read_only=True)  # Eval/predict too.
  abstract, shardings = _abstract_and_shardings()
  _, step = ckpt.restore_params(abstract.params, shardings.params)
  ckpt.close()
  assert step == 2


def test_checksums_detect_a_finite_change():
  params = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4)}
  a, finite = checkpointing.checksums({"params": params})
  assert finite
  swapped = {"w": params["w"].at[0, 0].set(1.0).at[0, 1].set(0.0)}  # Same sum.
  b, _ = checkpointing.checksums({"params": swapped})
  assert a != b
  _, finite = checkpointing.checksums({"params": {"w": params["w"].at[1, 1].set(jnp.inf)}})
  assert not finite


def test_host_checksums_equal_the_jitted_ones():
  """Arrays in host memory are hashed by numpy, others by `_inspect`: one checksum."""
  rng = np.random.default_rng(0)
  tree = {"params": {"f32": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
                     "bf16": jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16),
                     "i8": jnp.asarray(rng.integers(-9, 9, size=(2, 3, 2)), jnp.int8),
                     "flag": jnp.asarray([True, False, True]),
                     "scalar": jnp.float32(2.5)},
          "progress": {"rng": jax.random.key(3), "raw": jax.random.PRNGKey(4)}}
  sums, finite = checkpointing._inspect(tree)
  host_sums, host_finite = checkpointing._inspect_host(tree)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, sums), host_sums)
  assert bool(finite) and host_finite
  inf = {"params": {"w": jnp.asarray([1.0, np.inf], jnp.bfloat16)}}
  assert not checkpointing._inspect_host(inf)[1]
  assert not bool(checkpointing._inspect(inf)[1])


def test_read_only_restore_falls_back_without_moving(tmp_path):
  _save_steps(tmp_path, [2, 4])
  _break_data_json(str(tmp_path / "4"))
  ckpt, state = _restore(tmp_path, read_only=True)
  ckpt.close()
  assert int(state.step) == 2
  assert "4" in _step_dirs(tmp_path)
  _break_garbage_arrays(str(tmp_path / "4"))
  ckpt = checkpointing.Checkpointer(str(tmp_path), read_only=True)
  abstract, shardings = _abstract_and_shardings()
  params, step = ckpt.restore_params(abstract.params, shardings.params)
  ckpt.close()
  assert step == 2


@pytest.mark.parametrize("keep", [0, -1])
def test_max_to_keep_below_one_is_refused(tmp_path, keep):
  with pytest.raises(UserError, match="checkpoint.max_to_keep=.* must be >= 1"):
    checkpointing.Checkpointer(str(tmp_path), CheckpointConfig(max_to_keep=keep))


def _disk_full(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_save_is_one_line_naming_the_directory(tmp_path, monkeypatch):
  _save_steps(tmp_path, [2])
  ckpt = checkpointing.Checkpointer(str(tmp_path), CFG)
  monkeypatch.setattr(ckpt.manager, "save", _disk_full)
  with pytest.raises(UserError, match=f"no space left on the device of {tmp_path}"):
    ckpt.save(_state(4), _data())
  ckpt.close()
  ckpt, state = _restore(tmp_path)
  ckpt.close()
  assert int(state.step) == 2


@pytest.fixture
def tiny_tmpfs(tmp_path):
  mount_point = tmp_path / "tmpfs"
  mount_point.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                         str(mount_point)], capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                "the monkeypatched disk-full test covers the message")
  yield mount_point
  subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_on_a_real_tiny_filesystem(tiny_tmpfs):
  """Saves until the 256 KiB tmpfs is full: one line, older checkpoints intact."""
  directory = tiny_tmpfs / "checkpoints"
  ckpt = checkpointing.Checkpointer(str(directory), CheckpointConfig(max_to_keep=100))
  big = lambda step: _state(step).replace(  # pylint: disable=g-long-lambda
      params={"w": jax.random.normal(jax.random.PRNGKey(step), (64, 64)),
              "b": jnp.arange(8, dtype=jnp.float32)})
  saved = []
  with pytest.raises(UserError, match=f"no space left on the device of {directory}"):
    for step in range(1, 200):
      state = big(step)
      ckpt.save(state.replace(opt_state=TX.init(state.params)), _data())
      ckpt.wait()
      saved.append(step)
  try:
    ckpt.close()
  except UserError:
    pass
  assert saved, "the very first save already filled the disk"
  ckpt = checkpointing.Checkpointer(str(directory), CFG, read_only=True)
  last = big(saved[-1])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          last.replace(opt_state=TX.init(last.params)))
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restored = ckpt.restore_latest(abstract, jax.tree.map(lambda _: one_device, abstract),
                                 _data())
  ckpt.close()
  assert int(restored.step) == saved[-1]


def test_a_non_finite_state_is_not_saved(tmp_path):
  _save_steps(tmp_path, [2])
  ckpt = checkpointing.Checkpointer(str(tmp_path), CFG)
  diverged = _state(4).replace(params={"w": jnp.full((4, 8), jnp.inf), "b": jnp.zeros((8,))})
  with pytest.raises(UserError, match="training diverged: .* at step 4 are not finite"):
    ckpt.save(diverged, _data())
  ckpt.close()
  assert _step_dirs(tmp_path) == ["2"]
