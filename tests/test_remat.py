"""model.remat: the same loss, gradients and exit-path outputs as no remat (f32),
on the dense, sparse-training and exit paths; only the saved residuals shrink."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fake_data
from scanformer_jax import early_exit, losses, sharding, train_state
from scanformer_jax.config import LossConfig, MeshConfig, ModelConfig
from scanformer_jax.exit_scan import ExitScan
from scanformer_jax.model import ScanFormer

CFG = ModelConfig.tiny(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2,
                       encoder1_layers=1, image_sizes=(32, 64), exit_heads=("halt",))
LOSS = LossConfig(target_ratio=(1.0, 0.5))
TOL = 1e-6


def _batch(n: int = 4) -> dict:
  rows = [fake_data.make_example(3, i, CFG.image_size, CFG.max_text_len) for i in range(n)]
  return {k: jnp.asarray(np.stack([r[k] for r in rows]))
          for k in ("image", "text_ids", "text_mask", "box", "valid")}


@pytest.fixture(scope="module")
def params():
  return train_state.init_params(CFG, jax.random.PRNGKey(0))


def _loss_and_grads(remat: str, mode: str, params, batch):
  cfg = CFG.replace(remat=remat)

  def loss_fn(p):
    out = ScanFormer(cfg).apply({"params": p}, batch["image"], batch["text_ids"],
                                batch["text_mask"], mode=mode, train=True,
                                rngs={"gumbel": jax.random.PRNGKey(3)}, slots=(4, 8))
    return losses.scanformer_loss(out, batch["box"], batch["valid"], LOSS)[0]
  return jax.jit(jax.value_and_grad(loss_fn))(params)


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert np.abs(x - y).max() <= TOL * max(1.0, np.abs(y).max()), np.abs(x - y).max()


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_remat_keeps_loss_and_gradients(params, mode):
  batch = _batch()
  loss0, grads0 = _loss_and_grads("none", mode, params, batch)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads0)) > 0
  for remat in ("layer", "dots"):
    loss, grads = _loss_and_grads(remat, mode, params, batch)
    _close(loss, loss0)
    _close(grads, grads0)


def test_remat_saves_fewer_residuals(params):
  """The backward pass keeps less with remat (what `bench --train --memory` reports)."""
  batch = _batch()

  def residual_bytes(remat):
    cfg = CFG.replace(remat=remat)
    f = lambda p: ScanFormer(cfg).apply(  # noqa: E731
        {"params": p}, batch["image"], batch["text_ids"], batch["text_mask"], mode="dense",
        train=True, rngs={"gumbel": jax.random.PRNGKey(3)}).boxes.sum()
    _, backward = jax.vjp(f, params)  # A pytree whose leaves are the saved residuals.
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(backward))
  assert residual_bytes("layer") < residual_bytes("dots") < residual_bytes("none")


def test_remat_exit_path_outputs_match(params):
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  shardings = sharding.tree_shardings(params, mesh, MeshConfig(data=1))
  batch = {k: np.asarray(v) for k, v in _batch().items()}
  outs = [ExitScan(CFG.replace(remat=r), mesh, shardings, [early_exit.parse("halt_head:0.5")])(
      params, batch) for r in ("none", "layer")]
  for key in ("boxes", "exit_scale", "halt_prob", "taken"):
    _close(outs[1][key], outs[0][key])
