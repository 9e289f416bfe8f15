"""eval's JSON is strict (NaN -> null, counted) and reports the samples skipped as bad."""

import json

import numpy as np

from data_pipelines import bad_input
from scanformer_jax import evaluate
from scanformer_jax.cli import eval as eval_cmd
from test_eval import _batches, rigged  # noqa: F401  (module fixture)


def _strict_load(path):
  def refuse(token):
    raise ValueError(f"non-strict JSON token {token}")
  with open(path) as f:
    return json.load(f, parse_constant=refuse)


def test_non_finite_values_become_null_and_are_counted(tmp_path):
  reports = {"validation": {"acc@0.5": float("nan"), "mean_iou": 0.5,
                            "acc@0.5_per_scale": [0.1, float("inf"), 0.3],
                            "early_exit": {"gflops": float("-inf")}}}
  path = tmp_path / "eval.json"
  eval_cmd.write_json_report(reports, str(path))
  out = _strict_load(path)["validation"]
  assert out["acc@0.5"] is None and out["mean_iou"] == 0.5
  assert out["acc@0.5_per_scale"] == [0.1, None, 0.3]
  assert out["early_exit"]["gflops"] is None
  assert out["non_finite_values"] == 3
  assert not (tmp_path / "eval.json.partial").exists()


class _CountedBatches:
  """Batches with the `stats` a data_pipelines eval iterator carries."""

  def __init__(self, batches, stats):
    self._batches, self.stats = batches, stats

  def __iter__(self):
    return iter(self._batches)


def test_report_counts_samples_skipped_as_bad(rigged):  # noqa: F811
  config, cfg, mesh, params, step = rigged
  batches, _ = _batches(config, num_batches=1, batch=8)
  stats = bad_input.SkipStats("fixture (eval)", max_bad_fraction=1.0)
  bad = np.zeros(len(bad_input.BAD_REASONS), np.int64)
  bad[bad_input.BAD_REASONS.index("image")] = 2
  bad[bad_input.BAD_REASONS.index("expression")] = 1
  stats.update(epoch=0, good=5, bad=bad, truncated=1)
  report = evaluate.evaluate_batches(cfg, params, step, _CountedBatches(batches, stats), mesh,
                                     progress=False)
  assert report["skipped_bad"] == 3
  assert report["skipped_by_reason"] == {"image": 2, "expression": 1}
  assert report["truncated_expressions"] == 1
