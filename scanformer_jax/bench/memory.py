"""Per-device memory of the compiled train step, read before renting (`bench --train --memory`).

Lowers the train step for the chosen preset, image sizes, per-device batch and
`--set` overrides (model.dtype, model.remat, train.microbatches, train.path, ...) on
abstract inputs (nothing is allocated) and reports, per train path:

- from XLA's `memory_analysis()` of the compiled program, per device: temp,
  arguments, outputs, aliased (donated state) and peak bytes
  (arguments + outputs - aliased + temp: everything live at once, an upper bound);
- `residual_bytes`: what the backward pass saves for one microbatch, from the traced
  program (`jax.ad_checkpoint.saved_residuals`, parameters excluded), independent of
  the backend: `residual_bytes_per_sample` per row plus `residual_bytes_fixed` saved
  once per microbatch whatever its rows (e.g. the bfloat16 copies of the weights).

XLA:CPU computes bfloat16 matmuls in float32, so on CPU the compiled bytes overstate
a bfloat16 model (its residual bytes do not: they are the traced dtypes).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from scanformer_jax.bench.common import MODES, host_info

CPU_BF16_NOTE = ("XLA:CPU computes bfloat16 matmuls in float32: on CPU the compiled "
                 "bytes overstate bfloat16 (residual bytes are the traced dtypes)")


def _nbytes(aval) -> int:
  import numpy as np  # pylint: disable=g-import-not-at-top
  return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


def residual_bytes(fn, params, *args) -> int:
  """Bytes the backward pass of `fn(params, *args)` saves, parameters excluded (traced
  only: the dtypes as written, whatever the backend computes in)."""
  # Public only as `jax.ad_checkpoint.print_saved_residuals`, which prints the same list.
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
  return sum(_nbytes(aval) for aval, where in saved_residuals(fn, params, *args)
             if not where.startswith("from the argument"))


def _abstract(tree, shardings):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def memory_config(model: str, image_sizes: Optional[Sequence[int]], global_batch: int,
                  overrides: Sequence[str], keep_ratio: float = 0.25):
  """The experiment config the memory bench lowers (preset, sizes, overrides)."""
  from scanformer_jax import config_io  # pylint: disable=g-import-not-at-top
  from scanformer_jax.config import (ExperimentConfig, LossConfig, ModelConfig,  # pylint: disable=g-import-not-at-top
                                     TrainConfig)
  base = getattr(ModelConfig, model)()
  if image_sizes:
    base = base.replace(image_sizes=tuple(image_sizes))
  config = ExperimentConfig(model=base, loss=LossConfig(target_ratio=(1.0,) + (keep_ratio,) * (
      base.num_scales - 1)), train=TrainConfig(batch_size=global_batch))
  return config_io.apply_overrides(config, [f"train.batch_size={global_batch}",
                                            *overrides])


def run_memory(model: str = "vilt_b32", batch_size: int = 2,
               image_sizes: Optional[Sequence[int]] = None, overrides: Sequence[str] = (),
               keep_ratio: float = 0.25) -> dict:
  """Compiled per-device bytes and saved residuals of the train step, per path.

  batch_size: rows per device (the global batch is that times the device count).
  Paths: both, or the one `--set train.path=...` names. The sparse path's slots are
  `train.capacity`, by default from the loss targets (keep_ratio at every scale >= 1).
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from scanformer_jax import optim, sharding, train_state, train_step  # pylint: disable=g-import-not-at-top
  from scanformer_jax.config import MeshConfig, OptimConfig  # pylint: disable=g-import-not-at-top

  load_start = list(os.getloadavg())
  devices = jax.device_count()
  config = memory_config(model, image_sizes, batch_size * devices, overrides, keep_ratio)
  cfg, tc = config.model, config.train
  paths = (tc.path,) if any(o.startswith("train.path=") for o in overrides) else MODES
  mesh_cfg = MeshConfig()
  mesh = sharding.make_mesh(mesh_cfg)
  tx, schedules = optim.make_optimizer(OptimConfig(), 1000)
  shardings = train_state.state_shardings(cfg, tx, mesh, mesh_cfg)
  state = _abstract(train_state.abstract_state(cfg, tx), shardings)
  global_batch, r, length = tc.batch_size, cfg.image_size, cfg.max_text_len
  batch_sh = sharding.batch_sharding(mesh)
  shapes = {"image": ((global_batch, r, r, 3), jnp.uint8),
            "content_hw": ((global_batch, 2), jnp.int32),
            "text_ids": ((global_batch, length), jnp.int32),
            "text_mask": ((global_batch, length), jnp.bool_),
            "box": ((global_batch, 4), jnp.float32), "valid": ((global_batch,), jnp.bool_)}
  batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sh) for k, (s, d) in shapes.items()}
  micro = global_batch // tc.microbatches // devices  # Rows one device runs at a time.

  def rows(n):  # A float32 (micro)batch of n rows and its Gumbel keys, abstract.
    batch = {k: jax.ShapeDtypeStruct((n,) + s[1:], jnp.float32 if k == "image" else d)
             for k, (s, d) in shapes.items() if k != "content_hw"}
    return batch, jax.ShapeDtypeStruct((n, 2), jnp.uint32)

  modes = {}
  for path in paths:
    path_tc = dataclasses.replace(tc, path=path)
    programs = train_step.make_train_step(cfg, config.loss, tx, schedules, path_tc,
                                          mesh.size)
    start = time.perf_counter()
    compiled = train_step.jit_train_step(programs, shardings, mesh).lower(
        state, batch).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    entry = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
             for name in ("temp", "argument", "output", "alias")}
    entry = {f"{k}_bytes": v for k, v in entry.items()}
    entry["peak_bytes"] = (entry["argument_bytes"] + entry["output_bytes"]
                           - entry["alias_bytes"] + entry["temp_bytes"])
    # XLA's own figure where the backend has one (on CPU it leaves out temp buffers).
    entry["xla_peak_memory_bytes"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    # Linear in the rows: a per-sample slope plus what every step saves once (e.g. the
    # bfloat16 copies of the weights), from traces of 1 and 2 rows.
    one, two = (residual_bytes(programs.loss, state.params, *rows(n)) for n in (1, 2))
    entry["residual_bytes_per_sample"] = two - one
    entry["residual_bytes_fixed"] = 2 * one - two
    entry["residual_bytes"] = entry["residual_bytes_fixed"] + micro * (two - one)
    entry["compile_s"] = compile_s
    modes[path] = entry
  return {"model": model, "image_sizes": list(cfg.image_sizes),
          "num_patches": list(cfg.num_patches), "dtype": cfg.dtype,
          "remat": getattr(cfg, "remat", "none"), "microbatches": tc.microbatches,
          "batch_size_per_device": batch_size, "devices": devices,
          "global_batch": global_batch, "overrides": list(overrides),
          "sparse_slots": list(tc.sparse_slots(cfg, config.loss)),
          "modes": modes, "note": CPU_BF16_NOTE if jax.default_backend() == "cpu" else "",
          "host": host_info(load_start)}


def _gb(n: float) -> str:
  return f"{n / 1e9:.3f}"


def format_memory(report: dict) -> str:
  """A readable table of one `run_memory` report."""
  lines = [
      f"scanformer bench --train --memory: {report['model']} {report['dtype']}, image sizes "
      f"{report['image_sizes']}, remat {report['remat']}, {report['microbatches']} "
      f"microbatch(es), batch {report['batch_size_per_device']} per device x "
      f"{report['devices']} device(s)",
      f"{'path':<8}{'peak GB':>10}{'temp GB':>10}{'args GB':>10}{'out GB':>10}"
      f"{'alias GB':>10}{'residual GB':>13}{'per sample':>12}{'fixed':>8}",
  ]
  for path, r in report["modes"].items():
    lines.append(f"{path:<8}{_gb(r['peak_bytes']):>10}{_gb(r['temp_bytes']):>10}"
                 f"{_gb(r['argument_bytes']):>10}{_gb(r['output_bytes']):>10}"
                 f"{_gb(r['alias_bytes']):>10}{_gb(r['residual_bytes']):>13}"
                 f"{_gb(r['residual_bytes_per_sample']):>12}"
                 f"{_gb(r['residual_bytes_fixed']):>8}")
  if report["note"]:
    lines.append(report["note"])
  return "\n".join(lines)
