"""The exit-aware sparse scan: samples that stop skip the finer scales.

A sample that exits at scale k must get the full scan's scale-k box; the exit path's
decisions must be the after-the-fact criterion's; the `last_scale` criterion must
reproduce today's sparse eval exactly; one compile serves every threshold and batch;
overflow of a capped sub-batch is counted, never silent.
"""

import chex
import jax
import numpy as np
import pytest
from data_pipelines.contract import DEVICE_KEYS

import fake_data
from scanformer_jax import early_exit, sharding, train_state
from scanformer_jax.config import MeshConfig, ModelConfig
from scanformer_jax.eval_step import EvalStep
from scanformer_jax.exit_scan import ExitScan, sub_batch_sizes

# Three scales (4, 16, 64 patches) with capacity buckets, and every exit head.
CFG = ModelConfig.tiny(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2,
                       encoder1_layers=1, exit_heads=("iou", "halt", "uncertainty"),
                       capacity_buckets=((4,), (8, 16), (32, 64)))
BATCH = 8


def _batch(start: int, padding: int = 1) -> dict:
  rows = [fake_data.make_example(1, start + i, CFG.image_size, CFG.max_text_len)
          for i in range(BATCH)]
  batch = {k: np.stack([r[k] for r in rows]) for k in DEVICE_KEYS}
  batch["valid"][BATCH - padding:] = False
  return batch


@pytest.fixture(scope="module")
def setup():
  """Params whose selection and heads vary between images (sharp heads)."""
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  # The seed gives exits at every scale for the thresholds the tests take.
  params = jax.tree.map(np.asarray, train_state.init_params(CFG, jax.random.PRNGKey(7)))
  params["select_head"]["logit"]["kernel"] = params["select_head"]["logit"]["kernel"] * 40
  for head in ("iou", "halt"):
    out = params["exit_heads"][head]["mlp"]["out"]
    out["kernel"] = out["kernel"] * 30
  shardings = sharding.tree_shardings(params, mesh, MeshConfig(data=1))
  full = EvalStep(CFG, mesh, shardings)
  chex.clear_trace_counter()
  # One exit program for three criteria, picked by name at run time: a second trace
  # raises.
  program = ExitScan(CFG, mesh, shardings,
                     [early_exit.parse(c) for c in ("halt_head:0.5", "last_scale", "oracle")],
                     sub_batches=(0.25, 0.5, 1.0), max_traces=1)
  return mesh, params, shardings, full, program


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def test_exited_samples_get_the_full_scans_box_and_one_compile(setup):
  """Per threshold: the exit scales are the criterion's on the full scan, each ran
  scale's box (and so the answer) is the full scan's (1e-5), each scale ran with the
  smallest sub-batch holding its scanning samples, and the program compiled once."""
  _, params, _, full_step, scan = setup
  criterion = scan.criteria[0]
  assert criterion.name == "halt_head"
  histograms = []
  for start in (0, 8):
    batch = _batch(start)
    full = _host(full_step(params, batch))
    valid = batch["valid"]
    # Thresholds from the halting probabilities: about half stop at scale 0, half
    # at scale 1, or nobody stops.
    halt = full["halt_prob"][valid]
    for threshold in (np.median(halt[:, 0]), np.median(halt[:, 1]), 1.1):
      histograms.append(_check_threshold(scan, params, criterion, batch, full, threshold))
  assert {h.index(max(h)) for h in histograms} == {0, 1, 2}, histograms
  assert sum(0 < h[0] < sum(h) for h in histograms) >= 2, histograms


def _check_threshold(scan, params, criterion, batch, full, threshold) -> list[int]:
  """The checks of the test above at one threshold; returns the exit histogram."""
  out = _host(scan(params, batch, threshold))
  valid = batch["valid"]
  expected = criterion.with_threshold(threshold).exit_scale(early_exit.model_outputs(full))
  np.testing.assert_array_equal(out["exit_scale"][valid], expected[valid])
  rows = np.arange(BATCH)
  np.testing.assert_allclose(out["answer"][valid],
                             full["boxes"][rows, out["exit_scale"]][valid], atol=1e-5)
  ran = out["ran"] & valid[:, None]  # [B, S]
  np.testing.assert_array_equal(ran, valid[:, None]
                                & (np.arange(3)[None] <= out["exit_scale"][:, None]))
  np.testing.assert_allclose(out["boxes"][ran], full["boxes"][ran], atol=1e-5)
  np.testing.assert_allclose(out["halt_prob"][ran], full["halt_prob"][ran], atol=1e-5)
  np.testing.assert_array_equal(out["taken"][ran], full["taken"][ran])
  sizes = (0,) + sub_batch_sizes(BATCH, (0.25, 0.5, 1.0))
  for s in (1, 2):
    assert out["rows_run"][0, s] == min(c for c in sizes if c >= ran[:, s].sum())
  assert not out["forced"].any()
  return np.bincount(expected[valid], minlength=3).tolist()


def test_last_scale_equals_todays_sparse_eval_exactly(setup):
  """Through the same program as the halting tests: the criterion is picked at run time."""
  _, params, _, full_step, program = setup
  batch = _batch(40, padding=0)
  full = _host(full_step(params, batch))
  out = _host(program(params, batch, criterion="last_scale"))
  np.testing.assert_array_equal(out["boxes"], full["boxes"])
  np.testing.assert_array_equal(out["answer"], full["boxes"][:, -1])
  np.testing.assert_array_equal(out["exit_scale"], np.full(BATCH, 2))
  np.testing.assert_array_equal(out["rows_run"][0], [BATCH] * 3)
  for key in ("taken", "num_dropped", "capacity", "pred_iou", "halt_prob", "box_scale"):
    np.testing.assert_array_equal(out[key], full[key], err_msg=key)


def test_the_oracle_reads_the_ground_truth_in_the_program(setup):
  _, params, _, full_step, program = setup
  batch = _batch(0)
  full = _host(full_step(params, batch))
  oracle = early_exit.parse("oracle")
  valid = batch["valid"]
  for threshold in (0.0, 0.05, 1.1):
    out = _host(program(params, batch, threshold, criterion="oracle"))
    expected = oracle.with_threshold(threshold).exit_scale(early_exit.model_outputs(full),
                                                           batch["box"])
    np.testing.assert_array_equal(out["exit_scale"][valid], expected[valid])
  with pytest.raises(ValueError, match="not in this program"):
    program(params, batch, criterion="iou_head")


def test_batch_level_exit_skips_the_remaining_scales(setup):
  """When every valid sample stops at scale 0 no later scale runs (sub-batch 0)."""
  _, params, _, full_step, scan = setup  # The halting program of the test above.
  batch = _batch(0)
  full = _host(full_step(params, batch))
  out = _host(scan(params, batch, -1.0))  # Every halting probability is >= -1.
  np.testing.assert_array_equal(out["rows_run"][0], [BATCH, 0, 0])
  assert (out["exit_scale"] == 0).all() and not out["ran"][:, 1:].any()
  np.testing.assert_allclose(out["answer"], full["boxes"][:, 0], atol=1e-6)
  assert (out["boxes"][:, 1:] == 0).all()


def test_a_full_sub_batch_forces_counted_exits(setup):
  """Sub-batch capped at a quarter of the batch (2 rows): of the 7 samples still
  scanning after scale 0, the last 5 stop there, flagged `forced`."""
  mesh, params, shardings, full_step, _ = setup
  scan = ExitScan(CFG, mesh, shardings, early_exit.parse("last_scale"), sub_batches=(0.25,))
  batch = _batch(0)
  full = _host(full_step(params, batch))
  out = _host(scan(params, batch))
  valid = batch["valid"]
  np.testing.assert_array_equal(out["forced"], valid & (np.arange(BATCH) >= 2))
  np.testing.assert_array_equal(out["exit_scale"][valid], [2, 2, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(out["rows_run"][0], [BATCH, 2, 2])
  np.testing.assert_allclose(out["answer"][:2], full["boxes"][:2, 2], atol=1e-5)
  np.testing.assert_allclose(out["answer"][2:7], full["boxes"][2:7, 0], atol=1e-6)


def test_sub_batch_sizes():
  assert sub_batch_sizes(64, (0.25, 0.5, 1.0)) == (16, 32, 64)
  assert sub_batch_sizes(3, (0.1, 0.5, 1.0)) == (1, 2, 3)
  with pytest.raises(ValueError, match="fractions"):
    sub_batch_sizes(8, (0.0,))
