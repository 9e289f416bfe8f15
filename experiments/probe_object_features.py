"""What a trained synthetic model's patch features know about each object: a linear probe.

    python experiments/probe_object_features.py --workdir runs/demo

Redraws the validation scenes of the run's synthetic dataset (the same scenes, with
every object's shape, colour, size and box), runs the dense scan with every patch
taken and a sentence that names nothing ("the object"), and pools the finest scale's
patch features over each object's patches at the output of every layer. A softmax
regression fit on the objects of the first 70 % of the scenes predicts each
attribute on the rest; the same probe on the pooled raw pixels is the baseline.
Accuracy well above the pixels' says the layers encode the attribute; a REG token
that reads the patches by attention gets about this much to match a word against.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import processing, synthetic, synthetic_builder  # noqa: E402
from scanformer_jax import data_source, workdir  # noqa: E402
from scanformer_jax.model import ScanFormer  # noqa: E402

ATTRIBUTES = ("shape", "color", "size")


def scenes_and_batch(run, num_scenes: int, text: str) -> tuple[list, dict]:
  """The first `num_scenes` validation scenes of the run's dataset and their model
  inputs (every scene with `text`)."""
  name = run.config.data.dataset.partition("/")[2]
  spec = synthetic_builder.config_from_spec(synthetic_builder.spec_from_name(name))
  scene_cfg = spec.scene_config()
  tokenizer = data_source.load_tokenizer(run.config)
  cfg = run.config.model
  scenes, rows = [], []
  for index in range(num_scenes):
    scene = synthetic.make_scene(spec.seed, "validation", index, scene_cfg)
    row, _ = processing.preprocess_single(scene.image, text, tokenizer, cfg.image_size,
                                          cfg.max_text_len)
    scenes.append(scene)
    rows.append(row)
  batch = {k: np.concatenate([r[k] for r in rows]) for k in ("image", "text_ids", "text_mask")}
  return scenes, batch


def finest_patch_features(cfg, params, batch: dict, chunk: int = 100) -> dict[str, np.ndarray]:
  """{layer name: [B, N, D]} the finest scale's patch tokens after each layer, dense
  scan with every patch taken."""
  cfg = dataclasses.replace(cfg, select_threshold=0.0)
  model = ScanFormer(cfg)

  @jax.jit
  def layer_outputs(params, image, text_ids, text_mask):
    _, state = model.apply({"params": params}, image, text_ids, text_mask, mode="dense",
                           capture_intermediates=lambda m, fn: (
                               fn == "__call__" and bool(m.path)
                               and m.path[-1].startswith("layers_")),
                           mutable=["intermediates"])
    # Each layer ran the text, then every scale in order: the last call is the finest.
    return {name: calls["__call__"][-1][0][:, 1:]  # [B, N, D] (REG dropped)
            for name, calls in state["intermediates"]["backbone"].items()}

  parts = [jax.tree.map(np.asarray, layer_outputs(
      params, *(batch[k][start:start + chunk] for k in ("image", "text_ids", "text_mask"))))
           for start in range(0, len(batch["image"]), chunk)]
  return {name: np.concatenate([p[name] for p in parts]) for name in sorted(parts[0])}


def object_patches(box: tuple[int, int, int, int], scene_size: int, grid: int) -> np.ndarray:
  """Row-major indices of the finest-grid patches whose centres fall in `box` (the
  nearest row / column when none does)."""
  centres = (np.arange(grid) + 0.5) * scene_size / grid  # [G]
  x0, y0, x1, y1 = box
  cols = np.flatnonzero((centres >= x0) & (centres < x1))
  rows = np.flatnonzero((centres >= y0) & (centres < y1))
  if not cols.size:
    cols = np.array([np.argmin(abs(centres - (x0 + x1) / 2))])
  if not rows.size:
    rows = np.array([np.argmin(abs(centres - (y0 + y1) / 2))])
  return (rows[:, None] * grid + cols[None, :]).reshape(-1)


def probe_accuracy(x_train, y_train, x_test, y_test, steps: int = 1500, lr: float = 0.5,
                   l2: float = 1e-3) -> float:
  """Test accuracy of a softmax regression (standardised features, gradient descent)."""
  classes = sorted(set(y_train))
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
  targets = np.eye(len(classes))[[classes.index(c) for c in y_train]]  # [n, C]
  weights, bias = np.zeros((x_train.shape[1], len(classes))), np.zeros(len(classes))
  for _ in range(steps):
    logits = x_train @ weights + bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    grad = (probs - targets) / len(x_train)
    weights -= lr * (x_train.T @ grad + l2 * weights)
    bias -= lr * grad.sum(0)
  predicted = np.asarray(classes)[np.argmax(x_test @ weights + bias, 1)]
  return float(np.mean(predicted == np.asarray(y_test)))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a run trained on a synthetic set")
  parser.add_argument("--scenes", type=int, default=600, help="validation scenes probed")
  parser.add_argument("--text", default="the object", help="the sentence every scene gets")
  parser.add_argument("--json", default=None, help="also write the accuracies here")
  args = parser.parse_args(argv)
  run = workdir.load_for_inference(args.workdir, None, None)
  cfg = run.config.model
  scenes, batch = scenes_and_batch(run, args.scenes, args.text)
  layers = finest_patch_features(cfg, run.params, batch)
  grid, side = cfg.image_size // cfg.patch_size, cfg.patch_size
  pixels = batch["image"].reshape(len(scenes), grid, side, grid, side, 3)  # the finest scale
  features = {"pixels": pixels.transpose(0, 1, 3, 2, 4, 5).reshape(len(scenes), grid * grid, -1),
              **layers}  # {name: [scenes, N, F]}
  pooled = {name: [] for name in features}
  labels = {a: [] for a in ATTRIBUTES}
  scene_of = []
  for i, scene in enumerate(scenes):
    for obj in scene.objects:
      idx = object_patches(obj.box, scene.image.shape[0], grid)
      for name, f in features.items():
        pooled[name].append(f[i, idx].mean(0))
      for a in ATTRIBUTES:
        labels[a].append(getattr(obj, a))
      scene_of.append(i)
  train = np.asarray(scene_of) < int(0.7 * len(scenes))
  result = {"workdir": args.workdir, "text": args.text, "objects": int(train.size),
            "test_objects": int((~train).sum()), "accuracy": {}}
  print(f"{train.size} objects in {len(scenes)} validation scenes; probes fit on "
        f"{train.sum()}, tested on {(~train).sum()}; sentence {args.text!r}")
  print(f"{'features':<12}" + "".join(f"{a:>8}" for a in ATTRIBUTES))
  for name, rows in pooled.items():
    x, accuracy = np.stack(rows), {}
    for a in ATTRIBUTES:
      y = np.asarray(labels[a])
      accuracy[a] = round(probe_accuracy(x[train], y[train], x[~train], y[~train]), 3)
    result["accuracy"][name] = accuracy
    print(f"{name:<12}" + "".join(f"{accuracy[a]:8.3f}" for a in ATTRIBUTES))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
