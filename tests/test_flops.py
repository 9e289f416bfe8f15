"""flops.py: the analytic count against a hand count and against XLA's cost analysis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanformer_jax import ModelConfig, ScanFormer, flops

# Matmul-dominated (hidden 512, MLP 2048, short sequences): XLA's count adds the
# elementwise work flops.py leaves out (LayerNorm, GELU, softmax, adds), ~2% here.
WIDE = ModelConfig.tiny(hidden_size=512, mlp_dim=2048, num_heads=4, num_layers=2,
                        encoder1_layers=1)
KEPT = (4, 8, 16)
B, L = 2, 8
XLA_RTOL = 0.04


def _xla_flops_per_sample(cfg, mode, compiled=False):
  """XLA's FLOPs of the jitted forward (abstract weights: nothing runs).

  compiled: XLA's count of the optimised executable (after dead-code elimination and
  fusion) rather than of the lowered program.
  """
  net = ScanFormer(cfg)
  image = jnp.zeros((B, cfg.image_size, cfg.image_size, 3))
  ids, mask = jnp.zeros((B, L), jnp.int32), jnp.ones((B, L), bool)
  variables = jax.eval_shape(net.init, jax.random.key(0), image, ids, mask)
  lowered = jax.jit(lambda v, i, t, m: net.apply(v, i, t, m, mode=mode)).lower(
      variables, image, ids, mask)
  cost = lowered.compile().cost_analysis() if compiled else lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # dict, or [dict] in some jax
  return cost["flops"] / B


def test_dense_flops_match_xla_cost_analysis():
  ratio = _xla_flops_per_sample(WIDE, "dense") / flops.dense_flops(WIDE, L)
  assert abs(ratio - 1) < XLA_RTOL, ratio


def test_sparse_flops_as_run_match_xla_cost_analysis():
  cfg = WIDE.replace(capacity=KEPT, select_topk=KEPT)
  ratio = _xla_flops_per_sample(cfg, "sparse") / flops.sparse_flops(cfg, L)
  assert abs(ratio - 1) < XLA_RTOL, ratio


def test_sparse_flops_as_run_match_compiled_program():
  """The as-run count is what the compiled sparse executable does at small capacities
  (padding slots, merged tokens, REG and text included), whatever gets selected."""
  capacities = (4, 6, 10)  # scale 0 takes all 4; 6 of 16 and 10 of 64 slots after it
  cfg = WIDE.replace(capacity=capacities)
  as_run = flops.sparse_flops_as_run(WIDE, L, capacities)
  assert as_run == flops.sparse_flops_as_run(cfg, L) == flops.sparse_flops(cfg, L)
  ratio = _xla_flops_per_sample(cfg, "sparse", compiled=True) / as_run
  assert abs(ratio - 1) < XLA_RTOL, ratio
  # Smaller than dense by far, and not the effective count of a sparser selection.
  assert as_run < 0.5 * flops.dense_flops(WIDE, L)
  assert flops.sparse_flops(cfg, L, [4, 2, 3]) < 0.9 * as_run


def test_eval_gflops_as_run_match_compiled_eval_step():
  """eval.json's gflops_as_run is what XLA counts in the compiled eval step."""
  from scanformer_jax import evaluate, sharding, train_state
  from scanformer_jax.config import MeshConfig
  from scanformer_jax.eval_step import EvalStep
  capacities = (4, 6, 10)
  cfg = WIDE.replace(capacity=capacities)
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  abstract = train_state.abstract_params(cfg)
  step = EvalStep(cfg, mesh, sharding.tree_shardings(abstract, mesh, MeshConfig(data=1)))
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  batch = {"image": spec((B, cfg.image_size, cfg.image_size, 3)),
           "text_ids": spec((B, L), jnp.int32), "text_mask": spec((B, L), bool),
           "box": spec((B, 4)), "valid": spec((B,), bool)}
  cost = step.lower(abstract, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  rows = {"text_len_run": np.full(B, L), "text_len": np.full(B, 5),
          "capacity": np.tile(capacities, (B, 1)), "taken": np.tile([4, 2, 3], (B, 1))}
  report = evaluate.gflops_report(cfg, rows, "sparse")
  ratio = cost["flops"] / B / (report["gflops_as_run"] * 1e9)
  assert abs(ratio - 1) < XLA_RTOL, ratio
  assert report["gflops_kept"] < 0.9 * report["gflops_as_run"]


def test_sparse_flops_as_run_without_capacity_exceeds_dense():
  """capacity None slots every patch and adds the merged tokens: no saving as run
  (69.85 vs 69.47 GFLOPs for vilt_b32 at 40 text tokens)."""
  cfg = ModelConfig.vilt_b32()
  assert flops.sparse_flops_as_run(cfg, 40) / 1e9 == pytest.approx(69.854, abs=1e-3)
  assert flops.dense_flops(cfg, 40) / 1e9 == pytest.approx(69.474, abs=1e-3)
  with pytest.raises(ValueError, match="capacities"):
    flops.sparse_flops_as_run(cfg, 40, (16, 16))


def test_hand_count_one_layer_one_scale():
  cfg = ModelConfig(hidden_size=8, num_heads=2, mlp_dim=16, num_layers=1, encoder1_layers=1,
                    image_sizes=(32,), patch_size=16, pos_grid_size=2, box_head_layers=2,
                    max_text_len=4, vocab_size=10)
  d, f = 8, 16
  text = 4 * 3 * d * d                    # last (only) layer of 3 text tokens: K, V only
  t, k = 5, 3 + 5                         # REG + 4 patches, attending to text + itself
  block = 8 * t * d * d + 4 * t * k * d + 4 * t * d * f
  patch_embed = 2 * 4 * (16 * 16 * 3) * d
  select = 2 * 4 * d                      # one logit per patch token
  box = 2 * d * d + 2 * d * 4             # hidden layer, then 4 outputs
  assert flops.dense_flops(cfg, 3) == text + block + patch_embed + select + box == 56576


def test_sparse_effective_counts():
  cfg = ModelConfig.vilt_b32(capacity=(16, 16, 64), select_topk=(16, 16, 64))
  # Taken counts equal to the capacities: exactly the program as run.
  assert flops.sparse_flops(cfg, 40, [16, 16, 64]) == pytest.approx(flops.sparse_flops(cfg, 40))
  # Everything taken: no merged token, the dense token counts.
  assert flops.sparse_flops(cfg, 40, list(cfg.num_patches)) == pytest.approx(
      flops.dense_flops(cfg, 40))
  # Per-sample counts broadcast; fewer tokens, fewer FLOPs.
  counts = np.array([[16, 16, 64], [16, 8, 20], [16, 0, 0]])
  per_sample = flops.sparse_flops(cfg, 40, counts)
  assert per_sample.shape == (3,)
  for row, value in zip(counts, per_sample):
    assert value == pytest.approx(flops.sparse_flops(cfg, 40, list(row)))
  assert per_sample[0] > per_sample[1] > per_sample[2]
  assert flops.dense_flops(cfg, 40) / flops.sparse_flops(cfg, 40) == pytest.approx(2.84, abs=0.01)


def test_forward_flops_rejects_wrong_scale_count():
  with pytest.raises(ValueError):
    flops.forward_flops(ModelConfig.tiny(), 8, (5, 17))
  with pytest.raises(ValueError):
    flops.sparse_flops(ModelConfig.tiny(), 8, np.zeros((2, 2)))
