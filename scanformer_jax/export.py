"""A trained run as a standalone artifact: `jax.export` (StableHLO) + params + tokenizer.

    scanformer export --workdir runs/demo --out runs/demo-export
    python runs/demo-export/run_exported.py --image photo.jpg --text "the red square"

The directory holds:
  model.stablehlo   the serialized `jax.export.Exported` forward
                    f(params: list, image [B, R, R, 3] f32, text_ids [B, L] i32,
                      text_mask [B, L] bool) -> {"boxes" [B, S, 4], "taken" per scale
                      [B, N_s] bool, "pred_iou" [B, S] (IoU head only)}
  params.npz        the parameters, the program's first argument in key order
  tokenizer.json    the BERT word-piece tokenizer (HuggingFace `tokenizers`)
  export.json       everything the preprocessing needs (sizes, ids, normalization)
  run_exported.py   a runner importing only jax, numpy, tokenizers and Pillow
  README.md         how to run and serve it, and what it leaves out

`scanformer_jax.load(DIR)` returns an `ExportedPredictor` with the `Predictor` API.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Sequence

import numpy as np

from scanformer_jax import export_runner
from scanformer_jax.errors import UserError

MODES = ("sparse", "dense")
RUNNER_FILE = "run_exported.py"
README_FILE = "README.md"

_README = """# Exported ScanFormer model

Exported from `{workdir}` (checkpoint step {step}), mode `{mode}`, batch size {batch},
platforms {platforms}, jax {jax_version}.

    python run_exported.py --image photo.jpg --text "the red square on the left"

prints one JSON line: `box` (x0, y0, x1, y1) in the upright image's pixels (the
finest scale's box), `boxes_per_scale`, `keep_ratio`, `truncated` and, with the IoU
head, `pred_iou`; the same fields as `scanformer predict`. It needs only `jax`,
`numpy`, `tokenizers` and `Pillow`; from Python, `scanformer_jax.load(this_dir)`
gives the same answers through the usual `Predictor` API.

## Serving it elsewhere

`model.stablehlo` is a serialized `jax.export.Exported`: read it with
`jax.export.deserialize` and call it, or take its StableHLO module
(`exported.mlir_module()`, also readable as portable StableHLO bytecode through
`exported.mlir_module_serialized`) into any StableHLO runtime: XLA's PJRT C API
from C++, IREE, or TensorFlow's XlaCallModule. Its inputs, in order: the arrays of
`params.npz` in key order, then image [B, R, R, 3] float32, text_ids [B, L] int32,
text_mask [B, L] bool, with B, R and L in `export.json` (B "null": any batch size).

## What it does not include

- Preprocessing: reading the image upright (EXIF), letterboxing to R x R at the
  top-left, normalizing pixels, and the word pieces are done by `run_exported.py` in
  numpy/Pillow/tokenizers; another runtime must restate them from `export.json`.
- Early exit, training, the scan picture and the eval metrics: only the forward.
- 16-bit and float images are read through Pillow's own RGB conversion, not the
  training pipeline's range scaling.
- Platforms other than the ones listed above: export again with `--platforms`.
"""


def export_run(workdir: str, out_dir: str, *, mode: str = "sparse",
               batch_size: Optional[int] = 1, step: Optional[int] = None, config=None,
               platforms: Optional[Sequence[str]] = None) -> dict:
  """Writes the artifact of `workdir`'s checkpoint to `out_dir`; returns its spec.

  batch_size None exports a batch-polymorphic program (any batch size).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
  from data_pipelines import contract  # pylint: disable=g-import-not-at-top
  from scanformer_jax import data_source, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from scanformer_jax import forward as forward_lib  # pylint: disable=g-import-not-at-top
  if mode not in MODES:
    raise UserError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
  if batch_size is not None and batch_size < 1:
    raise UserError(f"--batch-size {batch_size} must be >= 1")
  run = workdir_lib.load_for_inference(workdir, config, step)
  tokenizer = data_source.load_tokenizer(run.config)
  cfg = run.config.model
  leaves, treedef = jax.tree.flatten(run.params)
  leaves = [np.asarray(x) for x in leaves]

  def forward(params_leaves, image, text_ids, text_mask):
    params = jax.tree.unflatten(treedef, params_leaves)
    rows = forward_lib.rows(cfg, params, {"image": image, "text_ids": text_ids,
                                          "text_mask": text_mask}, mode, masks=True)
    result = {"boxes": rows["boxes"], "taken": rows["taken_masks"]}
    if "pred_iou" in rows:
      result["pred_iou"] = rows["pred_iou"]
    return result

  b = jax_export.symbolic_shape("b")[0] if batch_size is None else batch_size
  r, length = cfg.image_size, cfg.max_text_len
  specs = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
           jax.ShapeDtypeStruct((b, r, r, 3), np.float32),
           jax.ShapeDtypeStruct((b, length), np.int32),
           jax.ShapeDtypeStruct((b, length), np.bool_))
  platforms = tuple(platforms or (jax.default_backend(),))
  try:
    exported = jax_export.export(jax.jit(forward), platforms=platforms)(*specs)
  except Exception as e:  # pylint: disable=broad-except
    if batch_size is None:
      raise UserError(f"the {mode} forward cannot be exported for any batch size "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); export a "
                      "fixed --batch-size instead") from None
    raise
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, export_runner.PROGRAM_FILE), "wb") as f:
    f.write(exported.serialize())
  np.savez(os.path.join(out_dir, export_runner.PARAMS_FILE),
           **{f"{i:06d}": x for i, x in enumerate(leaves)})
  tokenizer._backend().save(os.path.join(out_dir, export_runner.TOKENIZER_FILE))  # pylint: disable=protected-access
  spec = {
      "format": export_runner.FORMAT_VERSION, "mode": mode, "batch_size": batch_size,
      "platforms": list(platforms), "image_size": r, "max_text_len": length,
      "image_sizes": list(cfg.image_sizes), "patch_size": cfg.patch_size,
      "cls_id": tokenizer.cls_id, "sep_id": tokenizer.sep_id, "pad_id": contract.PAD_ID,
      "pixel_mean": contract.PIXEL_MEAN, "pixel_std": contract.PIXEL_STD,
      "pad_value": contract.PAD_VALUE, "checkpoint_step": run.step,
      "jax_version": jax.__version__,
  }
  with open(os.path.join(out_dir, export_runner.SPEC_FILE), "w", encoding="utf-8") as f:
    json.dump(spec, f, indent=1)
  shutil.copyfile(export_runner.__file__, os.path.join(out_dir, RUNNER_FILE))
  with open(os.path.join(out_dir, README_FILE), "w", encoding="utf-8") as f:
    f.write(_README.format(workdir=os.path.abspath(workdir), step=run.step, mode=mode,
                           batch="any" if batch_size is None else batch_size,
                           platforms=", ".join(platforms), jax_version=jax.__version__))
  return spec


def is_export_dir(path: str | os.PathLike) -> bool:
  return os.path.isfile(os.path.join(path, export_runner.SPEC_FILE))


class ExportedPredictor:
  """An export directory behind the `Predictor` API (`__call__`, `predict_batch`)."""

  def __init__(self, path: str | os.PathLike):
    try:
      self.model = export_runner.ExportedModel(os.fspath(path))
    except export_runner.InputError as e:
      raise UserError(str(e)) from None
    self.spec = self.model.spec
    self.step = self.spec.get("checkpoint_step")
    self.batch_size = self.model.batch_size or 8

  def prepare(self, image, text: str, source: Optional[str] = None) -> dict:
    """One query read and preprocessed; a bad image or text raises a UserError."""
    from scanformer_jax.predictor import read_image  # pylint: disable=g-import-not-at-top
    if source is None and isinstance(image, (str, os.PathLike)):
      source = str(image)
    arr = read_image(image, source)
    try:
      return self.model.prepare(arr, text)
    except export_runner.InputError as e:
      raise UserError(f"{source or 'query'}: {e}") from None

  def predict_queries(self, queries: Sequence[dict], batch_size: Optional[int] = None):
    del batch_size  # The exported program fixes it.
    return [self._prediction(r) for r in self.model.predict_prepared(list(queries))]

  def predict_batch(self, images, texts, batch_size: Optional[int] = None):
    if len(images) != len(texts):
      raise ValueError(f"{len(images)} images but {len(texts)} texts")
    return self.predict_queries([self.prepare(im, t) for im, t in zip(images, texts)],
                                batch_size)

  def __call__(self, image, text: str):
    return self.predict_queries([self.prepare(image, text)])[0]

  @staticmethod
  def _prediction(result: dict):
    from scanformer_jax.predictor import Prediction  # pylint: disable=g-import-not-at-top
    geom = result["geometry"]
    meta = {"frame_size": geom["frame_size"], "orig_size": np.asarray(geom["orig_size"]),
            "scale": np.asarray(geom["scale"], np.float32),
            "offset": np.zeros(2, np.float32), "flip": False,
            "truncated": result["truncated"], "expression": result["text"]}
    return Prediction(text=result["text"], image_size=result["image_size"],
                      boxes=result["boxes"],
                      keep_ratio=tuple(float(t.mean()) for t in result["taken"]),
                      taken=result["taken"], frame_boxes=result["frame_boxes"], meta=meta,
                      truncated=bool(result["truncated"]), pred_iou=result["pred_iou"])
