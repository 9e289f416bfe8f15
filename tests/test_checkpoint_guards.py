"""Checkpointer guards on a tiny hand-made state: a step whose checksums went missing
is unverifiable (skipped), a checkpoint of another tree structure is refused without
being moved aside, the optimizer state can be left out of a restore, and a checkpoint
directory belongs to one workdir."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import test_checkpointing as helpers
from scanformer_jax import checkpointing
from scanformer_jax.errors import UserError


def test_a_step_without_its_metadata_is_unverifiable(tmp_path, caplog):
  """Metadata file deleted and the params changed: not restored silently."""
  helpers._save_steps(tmp_path, [2, 4])
  params = helpers._state(4).params
  helpers._replace_params(str(tmp_path / "4"), {**params, "w": params["w"].at[1, 2].set(3.0)})
  os.remove(tmp_path / "4" / "_CHECKPOINT_METADATA")
  ckpt, state = helpers._restore(tmp_path, read_only=True)
  ckpt.close()
  assert int(state.step) == 2
  assert "unverifiable" in caplog.text
  ckpt = checkpointing.Checkpointer(str(tmp_path), read_only=True)  # Eval/predict too.
  abstract, shardings = helpers._abstract_and_shardings()
  _, step = ckpt.restore_params(abstract.params, shardings.params)
  ckpt.close()
  assert step == 2


def test_steps_from_before_checksums_restore_with_a_warning(tmp_path, caplog):
  helpers._save_steps(tmp_path, [2])
  record = checkpointing.claim_directory(str(tmp_path), str(tmp_path / "w"), [2])  # An old run.
  checkpointing.write_run_record(str(tmp_path), record)  # With the first checkpoint.
  assert json.loads((tmp_path / checkpointing.RUN_FILE).read_text())["checksums_since"] == 3
  ckpt = checkpointing.Checkpointer(str(tmp_path), helpers.CFG)
  ckpt.custom_metadata = lambda step: {}  # As written before checksums existed.
  state = ckpt.restore_latest(*helpers._abstract_and_shardings(), helpers._data())
  ckpt.close()
  assert int(state.step) == 2 and "predates checksums" in caplog.text


def _other_structure():
  """The tiny state's shapes with a gradient-clipping optimizer (another opt_state)."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), helpers.TX)
  state = helpers._state(0)
  state = state.replace(opt_state=tx.init(state.params))
  return (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
          jax.tree.map(lambda x: x.sharding, state))


def test_another_optimizer_structure_is_refused_and_nothing_moved(tmp_path):
  helpers._save_steps(tmp_path, [2, 4])
  ckpt = checkpointing.Checkpointer(str(tmp_path), helpers.CFG)
  with pytest.raises(UserError, match=r"step 4 .* another structure .*nothing was moved.*"
                     r"--reset-optimizer") as info:
    ckpt.restore_latest(*_other_structure(), helpers._data())
  assert "\n" not in str(info.value)
  assert helpers._step_dirs(tmp_path) == ["2", "4"]
  state = ckpt.restore_latest(*_other_structure(), helpers._data(), reset_optimizer=True)
  ckpt.close()
  assert int(state.step) == 4 and state.opt_state is None
  np.testing.assert_array_equal(state.params["w"], np.full((4, 8), 4.0))


def test_a_checkpoint_directory_has_one_owner(tmp_path):
  directory = str(tmp_path / "shared")
  assert not os.path.exists(directory)  # Claiming writes nothing: the first save does.
  checkpointing.write_run_record(directory, checkpointing.claim_directory(
      directory, str(tmp_path / "a"), []))
  assert checkpointing.claim_directory(directory, str(tmp_path / "a"), []) is None  # The owner.
  with pytest.raises(UserError, match=f"belongs to the run in workdir {tmp_path / 'a'}"):
    checkpointing.claim_directory(directory, str(tmp_path / "b"), [])
