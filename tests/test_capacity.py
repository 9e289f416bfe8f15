"""Capacity buckets, calibration and the as-run FLOPs of a bucketed scan.

The bucketed scan must give the full-capacity scan's outputs whichever bucket a batch
lands in, compile once for all of them, and report the bucket it ran with.
"""

import os

import chex
import jax
import numpy as np
import pytest
from data_pipelines.contract import DEVICE_KEYS

import fake_data
from scanformer_jax import capacity, config_io, flops, sharding, train_state
from scanformer_jax.config import ExperimentConfig, MeshConfig, ModelConfig
from scanformer_jax.errors import UserError
from scanformer_jax.eval_step import EvalStep

# Three scales (4, 16, 64 patches), so a padded block is attended to by a later scale.
CFG = ModelConfig.tiny(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2,
                       encoder1_layers=1)
BUCKETS = ((4,), (4, 8, 12, 16), (8, 16, 32, 48, 64))
BATCH = 2
# Rows of 3: three groups of three, the first padded with two copies; rows of 2: four
# groups of two, the first padded with one copy.
GROUPED_BATCH = 7


def _batch(start: int, size: int = BATCH) -> dict:
  rows = [fake_data.make_example(1, start + i, CFG.image_size, CFG.max_text_len)
          for i in range(size)]
  return {k: np.stack([r[k] for r in rows]) for k in DEVICE_KEYS}


@pytest.fixture(scope="module")
def setup():
  """Params whose selection varies a lot between images (a sharp selection head)."""
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  # The seed gives rows that need different buckets at scales 1 and 2.
  params = jax.tree.map(np.asarray, train_state.init_params(CFG, jax.random.PRNGKey(5)))
  params["select_head"]["logit"]["kernel"] = params["select_head"]["logit"]["kernel"] * 40
  shardings = sharding.tree_shardings(params, mesh, MeshConfig(data=1))
  return mesh, params, shardings


def expected_capacities(need: np.ndarray, buckets, group_rows) -> np.ndarray:
  """[B, S]: rows sorted by need (stably), cut into G = ceil(B / group_rows) groups
  of ceil(B / G) consecutive rows counted from the end (the padded first group holds
  the rest; group_rows None: one group), each group's bucket the smallest holding its
  largest need (the last if none)."""
  b, num_scales = need.shape
  groups = 1 if group_rows is None else -(-b // group_rows)
  rows = -(-b // groups)
  out = np.zeros_like(need)
  for s in range(num_scales):
    order = np.argsort(need[:, s], kind="stable")
    first = b - rows * (groups - 1)
    for part in [order[:first]] + [order[i:i + rows] for i in range(first, b, rows)]:
      most = need[part, s].max()
      out[part, s] = min([c for c in buckets[s] if c >= most] or [buckets[s][-1]])
  return out


@pytest.mark.parametrize("rows", [None, 3, 2])
def test_buckets_match_full_capacity_in_one_compile(setup, rows):
  mesh, params, shardings = setup
  full = EvalStep(CFG, mesh, shardings)
  chex.clear_trace_counter()
  bucketed = EvalStep(CFG.replace(capacity_buckets=BUCKETS, capacity_group_rows=rows), mesh,
                      shardings, max_traces=1)
  used = set()
  for start in range(0, 4 * GROUPED_BATCH, GROUPED_BATCH):
    batch = sharding.to_global(_batch(start, GROUPED_BATCH), mesh)
    want, got = sharding.fetch(full(params, batch)), sharding.fetch(bucketed(params, batch))
    np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-5)
    np.testing.assert_array_equal(got["taken"], want["taken"])
    assert not got["num_dropped"].any()
    expect = expected_capacities(want["taken"], BUCKETS, rows)
    np.testing.assert_array_equal(got["capacity"], expect)
    assert (want["capacity"] == np.array(CFG.num_patches)).all()
    used.update(map(tuple, expect))
  assert len({u[1] for u in used}) >= 2 and len({u[2] for u in used}) >= 2, used
  if rows is not None:  # Rows of one batch ran different buckets.
    assert any(len(set(got["capacity"][:, s])) > 1 for s in (1, 2)), got["capacity"]


def test_groups_cut_the_slots_run(setup):
  """Capacity groups run fewer slots than one bucket per batch, for the same answers."""
  mesh, params, shardings = setup
  one = EvalStep(CFG.replace(capacity_buckets=BUCKETS, capacity_group_rows=None), mesh, shardings)
  grouped = EvalStep(CFG.replace(capacity_buckets=BUCKETS, capacity_group_rows=3), mesh,
                     shardings)
  slots = {"one": 0, "grouped": 0}
  for start in range(0, 4 * GROUPED_BATCH, GROUPED_BATCH):
    batch = sharding.to_global(_batch(start, GROUPED_BATCH), mesh)
    a, b = sharding.fetch(one(params, batch)), sharding.fetch(grouped(params, batch))
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-5)
    slots["one"] += int(a["capacity"].sum())
    slots["grouped"] += int(b["capacity"].sum())
  assert slots["grouped"] < slots["one"], slots


def test_last_bucket_below_the_need_drops_and_counts(setup):
  mesh, params, shardings = setup
  small = ((4,), (2, 4), (4, 8))
  step = EvalStep(CFG.replace(capacity_buckets=small, capacity_group_rows=None), mesh, shardings)
  full = EvalStep(CFG, mesh, shardings)
  for start in range(0, 8 * BATCH, BATCH):  # A batch wanting more than 4 at scale 1.
    batch = sharding.to_global(_batch(start), mesh)
    want = sharding.fetch(full(params, batch))
    if (want["taken"][:, 1] > 4).any():
      break
  assert (want["taken"][:, 1] > 4).any()
  got = sharding.fetch(step(params, batch))
  assert (got["capacity"][:, 1] == 4).all()
  np.testing.assert_array_equal(got["num_dropped"][:, 1], np.maximum(want["taken"][:, 1] - 4, 0))
  np.testing.assert_array_equal(got["taken"][:, 1], np.minimum(want["taken"][:, 1], 4))


def test_calibrate_rounds_quantiles_up_and_caps():
  counts = np.stack([np.full(200, 4), np.arange(200) % 17, np.arange(200) % 65], 1)
  chosen, buckets = capacity.calibrate(counts, (4, 16, 64), 0.995)
  assert chosen == (4, 16, 64)  # quantile 16 -> 16 (capped), 64 -> 64
  assert buckets[0] == (4,)
  for sizes, total in zip(buckets[1:], (16, 64)):
    assert sizes[-1] == total and len(sizes) <= capacity.MAX_BUCKETS
    assert all(c % capacity.MULTIPLE == 0 for c in sizes)
  chosen, buckets = capacity.calibrate(np.stack([np.full(10, 4), np.zeros(10),
                                                 np.full(10, 9)], 1), (4, 16, 64), 0.5)
  assert chosen == (4, 4, 12) and buckets == ((4,), (4, 16), (12, 64))
  CFG.replace(capacity=chosen, capacity_buckets=buckets)  # A valid config.
  with pytest.raises(ValueError, match="quantile"):
    capacity.calibrate(counts, (4, 16, 64), 1.5)
  assert capacity.round_up(0, 64) == 4 and capacity.round_up(9, 64) == 12
  assert capacity.round_up(61, 64) == 64 and capacity.round_up(3, 4) == 4


def _slots_run(counts, sizes) -> int:
  return sum(min(c for c in sizes if c >= n) for n in counts)


def test_cheapest_buckets_beat_every_other_choice():
  """The dynamic programme's buckets run no more slots than any other set of at most
  `max_buckets` candidates ending at every patch (brute force on a 32-patch scale)."""
  import itertools
  rng = np.random.default_rng(0)
  counts = np.minimum(rng.geometric(0.12, 300), 32)
  candidates = list(range(4, 32, 4))
  for max_buckets in (1, 2, 3):
    chosen = capacity.cheapest_buckets(counts, 32, max_buckets)
    assert chosen[-1] == 32 and len(chosen) <= max_buckets
    best = min(_slots_run(counts, (*others, 32))
               for r in range(max_buckets)
               for others in itertools.combinations(candidates, r))
    assert _slots_run(counts, chosen) == best, (max_buckets, chosen)


def test_bucket_config_is_validated():
  for bad, message in [(((4,), (8, 4), (8,)), "ascending"), (((4,), (8,)), "one tuple"),
                       (((2,), (8,), (8,)), "scale 0"), (((4,), (8,), (80,)), "outside")]:
    with pytest.raises(ValueError, match=message):
      CFG.replace(capacity_buckets=bad)
  cfg = CFG.replace(capacity_buckets=BUCKETS)
  assert cfg.max_capacities == (4, 16, 64) and cfg.capacities == CFG.num_patches
  with pytest.raises(UserError, match="capacity_group_rows"):
    CFG.replace(capacity_group_rows=0)


def test_flops_as_run_adds_the_bucket_padding():
  cfg = CFG.replace(capacity_buckets=BUCKETS)
  fixed = CFG.replace(capacity=(4, 8, 16))
  # A fixed capacity: exactly flops.py's as-run count.
  assert capacity.flops_as_run(fixed, 8, [4, 8, 16]) == pytest.approx(
      flops.sparse_flops_as_run(fixed, 8))
  # The largest buckets: nothing padded.
  assert capacity.flops_as_run(cfg, 8, [4, 16, 64]) == pytest.approx(
      flops.sparse_flops_as_run(cfg, 8, (4, 16, 64)))
  # Bucket 8 of 16 at scale 1: scale 2's block (1 + 16 + 1 tokens) attends to 8 padding
  # keys in each of the 2 layers.
  extra = 4.0 * 2 * 18 * 8 * 32
  assert capacity.flops_as_run(cfg, 8, [4, 8, 16]) == pytest.approx(
      flops.sparse_flops_as_run(cfg, 8, (4, 8, 16)) + extra)
  per_sample = capacity.flops_as_run(cfg, np.array([8, 8]), np.array([[4, 8, 16], [4, 16, 64]]))
  assert per_sample.shape == (2,) and per_sample[0] < per_sample[1]


def test_write_capacities_keeps_the_rest_of_the_config(tmp_path):
  path = str(tmp_path / "config.json")
  config = ExperimentConfig(model=CFG)
  config_io.save_json(config, path)
  capacity.write_capacities(path, (4, 8, 16), BUCKETS)
  loaded = config_io.load_json(path)
  assert loaded.model == CFG.replace(capacity=(4, 8, 16), capacity_buckets=BUCKETS)
  assert loaded.replace(model=CFG) == config
  assert train_state.abstract_params(loaded.model) is not None


@pytest.mark.slow
def test_demo_stages_calibrate_then_eval_sparse_and_dense(tmp_path, monkeypatch, capsys):
  """run_demo's calibrate / eval / eval --mode dense stages on a few-step fake run."""
  import importlib.util
  import json
  import train_helpers
  from scanformer_jax import cli, workdir as workdir_lib
  workdir = str(tmp_path / "run")
  train_helpers.run_cli(["train", "--config", train_helpers.FAKE_CONFIG, "--workdir", workdir,
                         "--no-progress", "--set", "train.num_steps=2"])
  spec = importlib.util.spec_from_file_location(
      "run_demo", str(train_helpers.ROOT / "experiments" / "run_demo.py"))
  run_demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(run_demo)
  # The stages in this process (the "fake" dataset is registered here only).
  quiet = lambda args: args if args[0] == "bench" else args + ["--no-progress"]  # noqa: E731
  monkeypatch.setattr(run_demo, "_run", lambda stage, args, env, timings, capture=False: (
      timings.setdefault(stage, 0.0), cli.main(quiet(args)) == 0 or
      pytest.fail(f"{stage} failed")))
  # The stages compare the sparse path with dense: calibrate's plan timing must not
  # send the first eval to dense (on the tiny model dense is often faster), so the
  # timings are injected with sparse the faster plan.
  monkeypatch.setattr(capacity, "paired_timer", lambda batch_size, runs: {
      "sparse": [1.0], "dense": [2.0]})
  # gallery None: the fake dataset has no original images to draw.
  eval_json, dense_json, throughput_json = run_demo._calibrated_evals(workdir, None, [], {}, {})
  model = workdir_lib.load_config(workdir).model
  calibration = json.load(open(capacity.calibration_path(workdir)))
  assert model.capacity == tuple(calibration["capacity"])
  assert model.capacity_buckets == tuple(map(tuple, calibration["capacity_buckets"]))
  assert model.capacity_buckets[-1][-1] == model.num_patches[-1]  # Never drops.
  sparse = json.load(open(eval_json))["validation"]
  dense = json.load(open(dense_json))["validation"]
  assert sparse["mode"] == "sparse" and dense["mode"] == "dense"
  assert sparse["count"] == dense["count"] == calibration["count"] > 0
  assert sparse["patches_dropped"] == 0 and sparse["overflow_fraction"] == 0.0
  used = sparse["capacity_used"][1]
  assert sum(used.values()) == sparse["count"]
  assert set(map(int, used)) <= set(model.capacity_buckets[1])
  assert dense["gflops_as_run"] >= dense["gflops_dense"]  # Padded text as run.
  assert sparse["gflops_kept"] <= sparse["gflops_dense"]
  throughput = json.load(open(throughput_json))
  assert set(throughput["modes"]) == {"dense", "bucketed", "grouped"}
  assert throughput["samples"] == sparse["count"]
  modes = throughput["modes"]
  # The grouped run's slots are at most the one-bucket run's, at least the kept ones.
  assert (np.asarray(modes["grouped"]["mean_capacity"])
          <= np.asarray(modes["bucketed"]["mean_capacity"]) + 1e-9).all()
  assert modes["grouped"]["gflops_as_run"] == pytest.approx(sparse["gflops_as_run"])
  assert modes["dense"]["gflops_as_run"] == pytest.approx(dense["gflops_as_run"])
  assert modes["grouped"]["gflops_kept"] <= modes["grouped"]["gflops_as_run"]
  row = run_demo.speedup_row(throughput)
  assert "kept-FLOPs ratio" in row[1]
  env = run_demo.data_parallel_env({"JAX_PLATFORMS": "cpu"}, 6)
  assert "--xla_force_host_platform_device_count=" in env["XLA_FLAGS"]
  devices = int(env["XLA_FLAGS"].rsplit("=", 1)[1])
  assert 6 % devices == 0 and devices <= (os.cpu_count() or 1)
  assert run_demo.data_parallel_env({"JAX_PLATFORMS": "gpu"}, 6) == {"JAX_PLATFORMS": "gpu"}


def test_sort_based_selection_equals_lax_top_k_with_ties():
  """The per-sample stable sort picks what lax.top_k picks, ties to the lower index
  (the four children of a parent share its score)."""
  from scanformer_jax import selection
  rng = np.random.default_rng(0)
  scores = np.repeat(rng.integers(0, 4, (6, 16)).astype(np.float32), 4, axis=1)  # [6, 64]
  wanted = rng.uniform(size=(6, 64)) < 0.6
  masked = np.where(wanted, scores, -1e9)
  _, want_index = jax.lax.top_k(masked, 20)
  index, valid, taken, dropped = selection.capacity_slots(wanted, scores, 20)
  np.testing.assert_array_equal(np.asarray(index)[np.asarray(valid)],
                                np.asarray(want_index)[np.asarray(valid)])
  np.testing.assert_array_equal(np.asarray(dropped), np.maximum(wanted.sum(1) - 20, 0))
  assert (np.asarray(taken).sum(1) == np.minimum(wanted.sum(1), 20)).all()
  mask = np.asarray(selection.topk_mask(wanted, scores, 7))
  ref = np.zeros_like(wanted)
  np.put_along_axis(ref, np.asarray(jax.lax.top_k(masked, 7)[1]), True, axis=1)
  np.testing.assert_array_equal(mask, ref & wanted)
