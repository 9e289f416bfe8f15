"""Evaluation: hand-checkable Acc@0.5 / mIoU through the real jitted sparse step,
padding excluded, one compile across batches, early exit and blanked expressions."""

import chex
import jax
import numpy as np
import pytest
from data_pipelines.contract import DEVICE_KEYS

import fake_data
import train_helpers
from scanformer_jax import config_io, early_exit, evaluate, sharding, train_state
from scanformer_jax.config import EvalConfig, ExperimentConfig, MeshConfig, ModelConfig
from scanformer_jax.errors import UserError
from scanformer_jax.eval_step import EvalStep

PRED = np.array([0.5, 0.5, 0.4, 0.4], np.float32)  # What the rigged model always says.
# Ground truths and their IoU with PRED, by hand (PRED = [0.3, 0.7] x [0.3, 0.7]):
CASES = [
    ([0.5, 0.5, 0.4, 0.4], 1.0),      # identical
    ([0.6, 0.5, 0.4, 0.4], 0.6),      # shifted 0.1: inter 0.3*0.4=0.12, union 0.2
    ([0.7, 0.5, 0.4, 0.4], 1 / 3),    # shifted 0.2: inter 0.08, union 0.24
    ([0.1, 0.1, 0.1, 0.1], 0.0),      # disjoint
    ([0.5, 0.45, 0.4, 0.4], 7 / 9),  # shifted 0.05 in y: inter 0.14, union 0.18
]


@pytest.fixture(scope="module")
def rigged():
  """The tiny test model with a box head that outputs PRED whatever it sees."""
  config = config_io.load_config_file(train_helpers.FAKE_CONFIG)
  cfg = config.model
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  params = jax.tree.map(np.asarray, train_state.init_params(cfg, jax.random.PRNGKey(0)))
  out = params["box_head"]["mlp"]["out"]
  out["kernel"] = np.zeros_like(out["kernel"])
  out["bias"] = np.log(PRED / (1 - PRED))  # sigmoid^-1
  shardings = sharding.tree_shardings(params, mesh, MeshConfig(data=1))
  chex.clear_trace_counter()
  step = EvalStep(cfg, mesh, shardings, max_traces=1)  # A second trace raises.
  return config, cfg, mesh, params, step


def _batches(config, num_batches: int, batch: int):
  """Batches cycling through CASES; the last rows of the last batch are padding."""
  cfg = config.model
  rows, truth = [], []
  for i in range(num_batches * batch):
    row = fake_data.make_example(0, i, cfg.image_size, cfg.max_text_len)
    gt, iou = CASES[i % len(CASES)]
    row["box"] = np.array(gt, np.float32)
    if i >= num_batches * batch - 3:  # padding: would score IoU 1 if counted
      row["valid"], row["box"] = np.bool_(False), PRED.copy()
    else:
      truth.append(iou)
    rows.append(row)
  batches = []
  for b in range(num_batches):
    chunk = rows[b * batch:(b + 1) * batch]
    out = {k: np.stack([r[k] for r in chunk]) for k in DEVICE_KEYS}
    out["meta"] = {"index": np.array([r["index"] if r["valid"] else -1 for r in chunk])}
    batches.append(out)
  return batches, np.array(truth)


def test_accuracy_by_hand_padding_excluded_and_one_compile(rigged):
  config, cfg, mesh, params, step = rigged
  batches, truth = _batches(config, num_batches=3, batch=8)  # 21 real rows, 3 padding
  report = evaluate.evaluate_batches(cfg, params, step, batches, mesh, progress=False)
  assert report["count"] == 21 == len(truth)
  assert report["acc@0.5"] == pytest.approx(np.mean(truth >= 0.5))
  assert report["acc@0.5"] == pytest.approx(13 / 21)  # 1.0, 0.6, 2/3 hit; 1/3, 0 miss
  assert report["mean_iou"] == pytest.approx(truth.mean(), abs=1e-5)
  assert report["acc@0.5_per_scale"] == pytest.approx([13 / 21] * cfg.num_scales)
  assert report["duplicates"] == 0
  assert len(report["keep_ratio"]) == cfg.num_scales and report["keep_ratio"][0] == 1.0
  assert all(0.0 <= k <= 1.0 for k in report["keep_ratio"])
  assert report["num_dropped"] == 0.0  # Full capacity: nothing dropped.
  assert 0 < report["gflops_kept"] <= report["gflops_dense"]
  # Full capacity slots every patch (+ merged tokens) at the padded text length.
  assert report["gflops_as_run"] > report["gflops_dense"] >= report["gflops_kept"]
  assert report["overflow_fraction"] == 0.0 and report["patches_dropped"] == 0
  assert report["capacity_used"] == [{str(n): 21} for n in cfg.num_patches]
  assert report["mode"] == "sparse"
  assert report["samples_per_s"] > 0  # Three batches, one trace (max_traces=1 above).
  assert report["model_samples_per_s"] >= report["samples_per_s"]  # Data loading left out.


def test_blanked_expressions_keep_cls_and_sep(rigged):
  config = rigged[0]
  batch, _ = _batches(config, 1, 4)
  ids = batch[0]["text_ids"]
  blank = evaluate.blank_expressions(batch[0])
  assert (blank["text_ids"][:, 0] == ids[:, 0]).all()
  assert (blank["text_ids"][:, 1] == fake_data.SEP).all()
  assert blank["text_mask"].sum(1).tolist() == [2] * 4
  assert (blank["text_ids"][:, 2:] == 0).all()


def test_iou_head_threshold_exit():
  criterion = early_exit.IouHeadCriterion(0.5)
  outputs = {"boxes": np.zeros((3, 3, 4)),
             "pred_iou": np.array([[0.7, 0.9, 0.9], [0.1, 0.6, 0.2], [0.1, 0.2, 0.3]])}
  np.testing.assert_array_equal(criterion.exit_scale(outputs), [0, 1, 2])
  np.testing.assert_array_equal(early_exit.LastScaleCriterion().exit_scale(outputs), [2, 2, 2])
  with pytest.raises(ValueError, match="IoU head"):
    criterion.exit_scale({"boxes": np.zeros((1, 3, 4))})


def test_a_retrace_is_caught(rigged):
  """The max_traces guard of the test above can fail: a new batch shape retraces."""
  config, cfg, mesh, params, _ = rigged
  chex.clear_trace_counter()
  step = EvalStep(cfg, mesh, sharding.tree_shardings(params, mesh, MeshConfig(data=1)),
                  max_traces=1)
  (small,), _ = _batches(config, 1, 4)
  (large,), _ = _batches(config, 1, 8)
  to_device = lambda b: sharding.to_global({k: b[k] for k in DEVICE_KEYS}, mesh)  # noqa: E731
  step(params, to_device(small))
  with pytest.raises(AssertionError, match="traced > 1 times"):
    step(params, to_device(large))


def test_criteria_registry_parses_names():
  assert early_exit.parse("iou_head:0.7") == early_exit.IouHeadCriterion(0.7)
  assert early_exit.parse("last_scale") == early_exit.LastScaleCriterion()
  assert {"iou_head", "last_scale"} <= set(early_exit.names())
  assert early_exit.parse("iou_head:0.7").spec == "iou_head:0.7"
  for bad, message in (("nope:1", "unknown exit criterion 'nope'"),
                       ("iou_head", "needs a number"), ("last_scale:3", "no argument")):
    with pytest.raises(ValueError, match=message):
      early_exit.parse(bad)


def test_criteria_never_see_the_true_iou(rigged):
  """exit_report hands a criterion the model's outputs only: no ground-truth `iou` or
  `gt_box` (only the oracle gets the ground truth)."""
  config, cfg, mesh, params, step = rigged
  seen = []

  class Spy:
    name = "spy"

    def exit_scale(self, outputs):
      seen.append(set(outputs))
      return early_exit.LastScaleCriterion().exit_scale(outputs)

  batches, _ = _batches(config, num_batches=1, batch=8)
  metrics, _ = evaluate.collect(cfg, params, step, batches, mesh, progress=False)
  rows = metrics.arrays()
  assert "iou" in rows and "gt_box" in rows  # The rows have them; the criterion must not.
  report = evaluate.exit_report(cfg, metrics, Spy())
  assert seen == [{"boxes", "taken", "num_dropped", "text_len", "wanted_next"}]
  assert report["acc@0.5"] == metrics.result()["acc@0.5"]


def test_exit_criterion_config_is_checked_against_the_model(rigged):
  config, cfg, *_ = rigged
  assert not cfg.exit_heads
  ok = config.replace(eval=EvalConfig(exit_criterion="last_scale"))
  assert evaluate.exit_criterion(ok) == early_exit.LastScaleCriterion()
  no_head = config.replace(eval=EvalConfig(exit_criterion="iou_head:0.8"))
  with pytest.raises(UserError, match="IoU head"):
    evaluate.exit_criterion(no_head)
  with_head = no_head.replace(model=cfg.replace(exit_heads=("iou",)))
  assert evaluate.exit_criterion(with_head) == early_exit.IouHeadCriterion(0.8)


def test_a_new_criterion_is_one_registered_class(monkeypatch):
  """The README's example: registering a class is all it takes to parse it by name."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  # Registered into a copy: the other tests of this process see the registry as shipped.
  monkeypatch.setattr(early_exit, "_REGISTRY", dict(early_exit._REGISTRY))

  @early_exit.register("test_stable_box")
  @dataclasses.dataclass(frozen=True)
  class StableBox:
    tol: float
    name: str = "test_stable_box"

    @classmethod
    def from_arg(cls, arg):
      return cls(float(arg))

    def exit_scale(self, outputs):
      still = np.abs(np.diff(outputs["boxes"], axis=1)).max(-1) < self.tol  # [B, S-1]
      stop = np.concatenate([np.zeros_like(still[:, :1]), still], axis=1)  # [B, S]
      stop[:, -1] = True
      return np.argmax(stop, axis=1).astype(np.int32)

  boxes = np.zeros((2, 3, 4))
  boxes[1, 1:] = 0.5  # Sample 1 moves between scales 0 and 1, then stays.
  criterion = early_exit.parse("test_stable_box:0.1")
  assert criterion == StableBox(0.1) and "test_stable_box" in early_exit.names()
  np.testing.assert_array_equal(criterion.exit_scale({"boxes": boxes}), [1, 2])
  # It has no `grid`: a default sweep skips it and says how to give a threshold; asked
  # for by name without one, a one-line error.
  from scanformer_jax import exit_sweep  # pylint: disable=g-import-not-at-top
  config = ExperimentConfig(model=ModelConfig.tiny())
  chosen, skipped = exit_sweep.usable_specs(config, None)
  assert "box_stability:0.9" in chosen and "last_scale" in chosen
  assert not any(spec.startswith("test_stable_box") for spec in chosen)
  assert "test_stable_box:T" in skipped["test_stable_box"]
  assert exit_sweep.usable_specs(config, ["test_stable_box:0.2"])[0][0] == "test_stable_box:0.2"
  with pytest.raises(UserError, match="exit criterion 'test_stable_box'.*needs a threshold"):
    exit_sweep.usable_specs(config, ["test_stable_box"])
