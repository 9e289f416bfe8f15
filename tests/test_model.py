"""model.py: the sparse scan equals the dense reference (DESIGN.md sections 2-3).

One tiny model with random weights for the whole module; every forward is jitted
once (see `forward`) and reused across tests, so the module compiles ~9 programs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanformer_jax import ModelConfig, ScanFormer, selection
from scanformer_jax.layers import EncoderLayer
from scanformer_jax.pyramid import build_pyramid

CFG = ModelConfig.tiny()
B, L = 2, 10
TEXT_LENGTHS = (10, 6)    # the second sample has 4 padding tokens
# Sparse capacities below the patch counts (for this seed and threshold):
#   overflow: more patches wanted than slots at every scale >= 1; not multiples of
#             4, so ties between siblings (same parent logit) must be cut too;
#   padding:  slots left empty at scale 2 (padding bias -inf), overflow at scale 1.
CAPACITIES = {"overflow": (4, 5, 6), "padding": (4, 10, 22)}
ATOL = 1e-4
# LLVM -O0: halves the CPU compile time of these tiny programs; the XLA graph
# optimisations (fusion, layout) and the numerics under test are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Smallest |sigmoid(logit) - threshold| allowed for a decision of the full-capacity
# scan: the two paths' logits differ by ~1e-6, so no decision can flip.
DECISION_MARGIN = 1e-4


def _inputs(seed):
  keys = jax.random.split(jax.random.key(seed), 2)
  image = jax.random.uniform(keys[0], (B, CFG.image_size, CFG.image_size, 3))
  text_ids = jax.random.randint(keys[1], (B, L), 1, CFG.vocab_size)
  text_mask = jnp.arange(L)[None, :] < jnp.array(TEXT_LENGTHS)[:, None]
  return image, jnp.where(text_mask, text_ids, 0), text_mask


@pytest.fixture(scope="module")
def inputs():
  return _inputs(0)


@pytest.fixture(scope="module")
def raw_variables(inputs):
  # The seed gives the cases of CAPACITIES (overflow, padding) for these inputs.
  return jax.jit(ScanFormer(CFG).init, compiler_options=FAST_COMPILE)(jax.random.key(43), *inputs)


@pytest.fixture(scope="module")
def variables(raw_variables):
  """Random weights with the selection logits spread (init std ~0.2 -> ~2), so that
  the threshold can sit in a wide gap between decisions."""
  params = raw_variables["params"]
  head = params["select_head"]["logit"]
  head = {**head, "kernel": head["kernel"] * 10.0}
  return {"params": {**params, "select_head": {**params["select_head"], "logit": head}}}


_FORWARDS = {}
TRACES = {}  # (cfg, mode, forced) -> times the Python forward was traced


def forward(cfg, mode, forced=False):
  """The jitted forward of (cfg, mode), built once per module; counts its traces."""
  key = (cfg, mode, forced)
  if key not in _FORWARDS:
    net = ScanFormer(cfg)
    TRACES[key] = 0

    def fn(variables, image, text_ids, text_mask, taken=None):
      TRACES[key] += 1
      return net.apply(variables, image, text_ids, text_mask, mode=mode, force_taken=taken)

    _FORWARDS[key] = jax.jit(fn, compiler_options=FAST_COMPILE)
  return _FORWARDS[key]


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _children(x, grid):
  """numpy twin of selection.upsample_to_children: [B, G*G] -> [B, 4*G*G]."""
  x = np.asarray(x).reshape(-1, grid, grid)
  return x.repeat(2, axis=1).repeat(2, axis=2).reshape(x.shape[0], -1)


@pytest.fixture(scope="module")
def threshold(variables, inputs):
  """A threshold in the widest gap of the scale-0 probabilities that splits every sample.

  Scale-0 logits do not depend on the threshold (every patch is taken there), nor
  do the outputs of a dense replay (forced masks): probe with one taking everything.
  """
  everything = tuple(jnp.ones((B, n), bool) for n in CFG.num_patches)
  probe = forward(CFG, "dense", forced=True)(variables, *inputs, everything)
  p0 = _sigmoid(probe.selection_logits[0])  # [B, N_0]
  lo, hi = p0.min(axis=1).max(), p0.max(axis=1).min()
  assert lo < hi, "no threshold splits every sample's scale-0 patches"
  points = np.unique(np.concatenate([[lo, hi], p0[(p0 >= lo) & (p0 <= hi)]]))
  gap = np.argmax(np.diff(points))
  return float((points[gap] + points[gap + 1]) / 2)


@pytest.fixture(scope="module")
def full(variables, inputs, threshold):
  """(sparse, dense) outputs at full capacity with the splitting threshold."""
  cfg = CFG.replace(select_threshold=threshold)
  return (forward(cfg, "sparse")(variables, *inputs),
          forward(cfg, "dense")(variables, *inputs))


@pytest.fixture(scope="module", params=sorted(CAPACITIES))
def small(request, variables, inputs, threshold):
  """(case name, sparse output with CAPACITIES[case] slots)."""
  cfg = CFG.replace(select_threshold=threshold, capacity=CAPACITIES[request.param])
  return request.param, forward(cfg, "sparse")(variables, *inputs)


def test_full_capacity_scan_has_taken_and_replaced_patches(full, threshold):
  sparse, dense = full
  for s in range(1, CFG.num_scales):
    counts = np.asarray(sparse.taken[s]).sum(axis=1)
    assert ((counts > 0) & (counts < CFG.num_patches[s])).all(), (s, counts)
  for s in range(CFG.num_scales):
    np.testing.assert_array_equal(sparse.taken[s], dense.taken[s])
  for s in range(CFG.num_scales - 1):  # Decisions made on taken patches only.
    p = _sigmoid(sparse.selection_logits[s])[np.asarray(sparse.taken[s])]
    assert np.abs(p - threshold).min() > DECISION_MARGIN, s
  assert not np.asarray(sparse.num_dropped).any()


def test_sparse_equals_dense_at_full_capacity(full):
  sparse, dense = full
  np.testing.assert_allclose(sparse.boxes, dense.boxes, atol=ATOL, rtol=0)
  np.testing.assert_allclose(sparse.reg_features, dense.reg_features, atol=ATOL, rtol=0)
  for s in range(CFG.num_scales):  # Logits of real tokens agree too.
    taken = np.asarray(sparse.taken[s])
    np.testing.assert_allclose(np.asarray(sparse.selection_logits[s])[taken],
                               np.asarray(dense.selection_logits[s])[taken], atol=ATOL, rtol=0)
  # Non-vacuous: the scales' REG features differ from each other.
  assert float(jnp.abs(dense.reg_features[:, 1] - dense.reg_features[:, 2]).max()) > 1e-2


def test_small_capacity_equals_dense_with_effective_masks(small, variables, inputs):
  _, small = small
  replay = forward(CFG, "dense", forced=True)(variables, *inputs, small.taken)
  for s in range(CFG.num_scales):
    np.testing.assert_array_equal(replay.taken[s], small.taken[s])
  np.testing.assert_allclose(small.boxes, replay.boxes, atol=ATOL, rtol=0)
  np.testing.assert_allclose(small.reg_features, replay.reg_features, atol=ATOL, rtol=0)


def test_small_capacity_counts_dropped_patches(small, threshold):
  case, small = small
  capacities = CAPACITIES[case]
  dropped = np.asarray(small.num_dropped)
  assert dropped.shape == (B, CFG.num_scales)
  assert (dropped[:, 0] == 0).all()
  for s in range(1, CFG.num_scales):
    grid = CFG.grid_sizes[s - 1]
    # What this scan wanted at s: its own taken_{s-1} and logits_{s-1} decide.
    parent_logits = np.asarray(small.selection_logits[s - 1])
    decide = np.asarray(small.taken[s - 1]) & (_sigmoid(parent_logits) > threshold)
    wanted = _children(decide, grid).astype(bool)
    scores = _children(parent_logits, grid)
    taken = np.asarray(small.taken[s])
    count, capacity = wanted.sum(axis=1), capacities[s]
    np.testing.assert_array_equal(dropped[:, s], np.maximum(count - capacity, 0))
    np.testing.assert_array_equal(taken.sum(axis=1), np.minimum(count, capacity))
    assert not (taken & ~wanted).any()
    for b in range(B):  # The lowest parent logits were the ones replaced.
      left_out = wanted[b] & ~taken[b]
      if left_out.any():
        assert scores[b][taken[b]].min() >= scores[b][left_out].max()
    if case == "overflow" or s == 1:
      assert dropped[:, s].sum() > 0, f"{case} scale {s}: the capacity never overflowed"
    else:
      assert (count < capacity).any(), f"{case} scale {s}: no padding slot"


def test_block_causal_pass_equals_scan_with_kv_cache(full, small, variables, inputs):
  reference = jax.jit(lambda v, image, ids, mask, taken: ScanFormer(CFG).apply(
      v, image, ids, mask, taken, method=ScanFormer.block_causal_reference),
                      compiler_options=FAST_COMPILE)
  for out in (full[0], small[1]):
    regs = reference(variables, *inputs, out.taken)
    np.testing.assert_allclose(regs, out.reg_features, atol=ATOL, rtol=0)


def test_public_steps_run_a_prefix_of_the_scan(full, variables, inputs, threshold):
  """encode_text, then scan_scale_sparse for scales 0 and 1: the full scan's first two."""
  cfg = CFG.replace(select_threshold=threshold)
  net = ScanFormer(cfg)

  def prefix(v, image, text_ids, text_mask):
    cache = net.apply(v, text_ids, text_mask, method=ScanFormer.encode_text)
    images = build_pyramid(image, cfg.image_sizes)
    wanted, scores, outs = jnp.ones((B, cfg.num_patches[0]), bool), None, []
    for s in range(2):
      out = net.apply(v, s, images[s], wanted, scores, cache,
                      method=ScanFormer.scan_scale_sparse)
      outs.append(out)
      cache = cache.append(out.kv)
      wanted, scores = selection.wanted_children(cfg, s, out.taken, out.selection_logits)
    return outs, cache

  outs, cache = jax.jit(prefix, compiler_options=FAST_COMPILE)(variables, *inputs)
  sparse = full[0]
  for s, out in enumerate(outs):
    np.testing.assert_array_equal(out.taken, sparse.taken[s])
    np.testing.assert_allclose(out.reg, sparse.reg_features[:, s], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out.selection_logits, sparse.selection_logits[s], atol=ATOL,
                               rtol=0)
  # Text, then [REG_0 | 4 patches], then [REG_1 | 16 slots | merged C_1].
  assert cache.bias.shape == (B, L + (1 + CFG.num_patches[0]) + (1 + CFG.num_patches[1] + 1))


def test_dense_training_gradients_reach_selection_head(raw_variables, inputs):
  """Init-scale logits (|logit| << logistic noise): the Gumbel decisions are mixed."""
  net = ScanFormer(CFG)
  target = jnp.array([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2]])

  def loss(params):
    out = net.apply({"params": params}, *inputs, mode="dense", train=True,
                    rngs={"gumbel": jax.random.key(7)})
    return jnp.abs(out.boxes - target[:, None]).sum(), out.taken

  grads, taken = jax.jit(jax.grad(loss, has_aux=True), compiler_options=FAST_COMPILE)(
      raw_variables["params"])
  for s, mask in enumerate(taken):
    values = np.asarray(mask)
    assert values.dtype == np.float32
    assert set(np.unique(values).tolist()) <= {0.0, 1.0}, s
    if s > 0:
      assert 0 < values.sum() < values.size, f"scale {s}: no mixed decisions to learn from"
  head = grads["select_head"]
  for leaf in jax.tree_util.tree_leaves(head):
    assert np.isfinite(np.asarray(leaf)).all()
  assert float(jnp.abs(head["logit"]["kernel"]).max()) > 0
  assert float(jnp.abs(head["logit"]["bias"]).max()) > 0


def test_forwards_compile_once_per_shape(full, variables, inputs, threshold):
  cfg = CFG.replace(select_threshold=threshold)
  for mode in ("sparse", "dense"):
    fn = forward(cfg, mode)
    for seed in (1, 2, 3):  # New batches of the same shapes: no retrace.
      jax.block_until_ready(fn(variables, *_inputs(seed)))
    assert TRACES[(cfg, mode, False)] == 1, mode
    assert fn._cache_size() == 1, mode  # pylint: disable=protected-access


def test_shape_checks_fire(variables, inputs):
  image, ids, mask = inputs
  net = ScanFormer(CFG)
  apply = lambda *args: jax.eval_shape(lambda v: net.apply(v, *args), variables)
  apply(image, ids, mask)  # The right shapes pass.
  with pytest.raises(AssertionError):
    apply(image[:, :64, :64], ids, mask)  # Not the finest image size.
  with pytest.raises(AssertionError):
    apply(image, ids, mask[:, :5])  # Mask and ids disagree.
  with pytest.raises(AssertionError):
    apply(image, ids.astype(jnp.float32), mask)  # Ids must be integers.
  layer, x = EncoderLayer(CFG), jnp.zeros((B, 3, CFG.hidden_size))
  layer_vars = jax.eval_shape(layer.init, jax.random.key(0), x, jnp.zeros((B, 1, 1, 3)))
  with pytest.raises(AssertionError):  # Bias over 4 keys for 3 tokens.
    jax.eval_shape(layer.apply, layer_vars, x, jnp.zeros((B, 1, 1, 4)))


# bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3). Through 4 layers of
# matmuls, LayerNorms and softmaxes the relative error of the O(1) REG features
# grows to ~1e-2; the boxes are sigmoids (slope <= 1/4) of a small head on them.
BF16_REG_RTOL = 5e-2  # relative L2 error of the REG features
BF16_BOX_ATOL = 1e-2


def test_bfloat16_compute_tracks_float32(full, variables, inputs):
  cfg = CFG.replace(dtype="bfloat16")
  dense32 = full[1]
  # Same masks for both precisions, so a near-threshold flip cannot hide in the error.
  dense16 = forward(cfg, "dense", forced=True)(variables, *inputs, dense32.taken)
  rel = (jnp.linalg.norm(dense16.reg_features - dense32.reg_features)
         / jnp.linalg.norm(dense32.reg_features))
  assert float(rel) < BF16_REG_RTOL
  np.testing.assert_allclose(dense16.boxes, dense32.boxes, atol=BF16_BOX_ATOL, rtol=0)
  assert float(rel) > 0  # bf16 really ran: not bit-identical to float32.
  # The bf16 sparse scan matches the bf16 dense replay of its own masks.
  sparse16 = forward(cfg, "sparse")(variables, *inputs)
  assert sparse16.boxes.dtype == jnp.float32
  replay16 = forward(cfg, "dense", forced=True)(variables, *inputs, sparse16.taken)
  rel = (jnp.linalg.norm(sparse16.reg_features - replay16.reg_features)
         / jnp.linalg.norm(replay16.reg_features))
  assert float(rel) < BF16_REG_RTOL
  np.testing.assert_allclose(sparse16.boxes, replay16.boxes, atol=BF16_BOX_ATOL, rtol=0)
