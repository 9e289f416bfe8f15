"""`make demo`: build the synthetic set, train synthetic_tiny on CPU, evaluate, predict.

`--config` runs the same stages for another synthetic config: a python config file
that also defines `SYNTHETIC_SPEC`, the dataset it trains on.

Every stage runs the real command (`scanformer data|train|eval|predict`) in a fresh
process, exactly as a user would; a rerun skips what is done (the dataset exists, the
workdir's training is finished and resumes to the same end). After training,
`scanformer calibrate` writes capacity buckets into the run's config.json, so the
evaluation runs only the slots the model's selection needs. Writes
`<workdir>/eval.json` (sparse path, validation split) with the validation gallery in
`<workdir>/gallery/index.html`, `<workdir>/eval_dense.json` (the same split on the
dense path), `<workdir>/throughput.json` (`bench --throughput`: dense and sparse eval
steps timed side by side, the measured sparse speedup; the eval stages run on the CPU
cores as a data-parallel mesh, `data_parallel_env`), the predict step's scan picture
`<workdir>/scan.png`, `<workdir>/eval_blank.json` (every expression blanked: how
much the model needs the sentence), the early-exit curves chosen on the validation
split and reported on the test split in `<workdir>/exit_sweep/` (`eval --exit-sweep`)
and, in the same process, the halt and IoU heads' exit thresholds calibrated on
validation with a risk guarantee (acc_drop <= EXIT_RISK with probability >= 1 -
EXIT_DELTA), reported on test, in `<workdir>/exit_calibration.json` (`eval
--exit-calibrate`), then prints a table with the demo targets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional

from scanformer_jax import config_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "synthetic_tiny.py")
TARGETS = {"acc": 0.90, "finest_keep": 0.5, "minutes": 15, "speedup_over_flops": 0.75,
           "exit_realised": 0.7, "blank_acc": 0.35, "shape_only_acc": 0.80}
# The calibrated early exit: acc_drop <= EXIT_RISK with probability >= 1 - EXIT_DELTA.
EXIT_RISK, EXIT_DELTA = 0.01, 0.1
EXIT_HEADS = ("halt_head", "iou_head")


def _run(stage: str, args: list[str], env: dict, timings: dict, capture=False) -> str:
  print(f"\n=== {stage}: scanformer {' '.join(args)}", flush=True)
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "scanformer_jax", *args], cwd=ROOT, env=env,
                        text=True, stdout=subprocess.PIPE if capture else None)
  timings[stage] = time.perf_counter() - start
  if proc.returncode != 0:
    sys.exit(f"demo: `{stage}` failed with exit code {proc.returncode}")
  if capture:
    print(proc.stdout, end="")
  return proc.stdout or ""


def _predict_input(workdir: str, module) -> tuple[str, str]:
  """A validation-split scene (not seen in training) saved as PNG, and its expression.

  Drawn with the demo dataset's object count and expression kinds, at 256 px.
  """
  from data_pipelines import synthetic, synthetic_builder  # pylint: disable=g-import-not-at-top
  spec = synthetic_builder.config_from_spec(module.SYNTHETIC_SPEC)
  scene = synthetic.make_scene(spec.seed, "validation", 7, spec.scene_config(image_size=256))
  path = os.path.join(workdir, "predict_input.png")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(scene.image).save(path)
  return path, scene.expressions[0].text


def data_parallel_env(env: dict, batch_size: int) -> dict:
  """`env` with the host's CPU cores as JAX devices (a data-parallel mesh), for the
  eval stages: each device runs the per-sample eval program on its own rows.

  On CPU one device spreads each large matmul over the cores, but the sparse scan's
  row groups run small matmuls that one core does alone (measured on 2 cores, one
  device: grouped sparse 1.70x dense; two devices: 2.50x). The device count is the
  largest that divides `batch_size` and is at most the core count. Left alone on an
  accelerator or when XLA_FLAGS already sets it.
  """
  flags = env.get("XLA_FLAGS", "")
  if env.get("JAX_PLATFORMS", "cpu") != "cpu" or "host_platform_device_count" in flags:
    return env
  cores = os.cpu_count() or 1
  devices = max(d for d in range(1, cores + 1) if batch_size % d == 0)
  return {**env, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}


def _calibrated_evals(workdir: str, gallery_dir: Optional[str], common: list[str],
                      env: dict, timings: dict) -> tuple[str, str, str]:
  """calibrate, eval the validation split sparse (buckets in row groups; with its
  gallery in `gallery_dir` unless None) and dense, and time both side by side
  (`bench --throughput`); the three JSONs."""
  _run("calibrate", ["calibrate", "--workdir", workdir, "--split", "validation",
                     "--quantile", "0.995", *common], env, timings)
  eval_json = os.path.join(workdir, "eval.json")
  gallery = ["--gallery", gallery_dir] if gallery_dir else []
  _run("eval", ["eval", "--workdir", workdir, "--split", "validation", "--json", eval_json,
                *gallery, *common], env, timings)
  dense_json = os.path.join(workdir, "eval_dense.json")
  _run("eval_dense", ["eval", "--workdir", workdir, "--split", "validation", "--mode",
                      "dense", "--json", dense_json, *common], env, timings)
  throughput_json = os.path.join(workdir, "throughput.json")
  _run("throughput", ["bench", "--throughput", "--workdir", workdir, "--split", "validation",
                      "--json", throughput_json], env, timings)
  return eval_json, dense_json, throughput_json


def _speedup_text(op: dict) -> str:
  """`1.31x (IQR 1.25-1.36, ...)`: the statistic the sweep measured, named."""
  spread = op.get("speedup_spread")
  if spread:
    return (f"speedup {spread['median']:.2f}x median of {spread['n']} paired ratios "
            f"(IQR {spread['q25']:.2f}-{spread['q75']:.2f}, range {spread['min']:.2f}-"
            f"{spread['max']:.2f})")
  return f"speedup {op['speedup']:.2f}x (fastest passes)"


def exit_rows(sweep: dict) -> list[tuple]:
  """The early-exit curve's summary: each criterion's operating point (Acc@0.5 within
  0.01 of no exit, fewest GFLOPs; chosen on one split, reported on another) and, for
  the cheapest one, the share of its GFLOPs saving that the real exit path realises
  in wall-clock."""
  view = sweep.get("reported") or sweep
  base, oracle = view["no_exit"], view["oracle"]
  where = f"chosen on {sweep['split']}, reported on {view['split']}"
  rows = [(f"early exit ({where}): no exit / oracle",
           f"acc {base['acc@0.5']:.4f} at {base['gflops']:.4f} GFLOPs / "
           f"acc {oracle['acc@0.5']:.4f} at {oracle['gflops']:.4f} GFLOPs "
           f"(mean exit scale {oracle['mean_exit_scale']:.2f})", "", None)]
  points = sweep["operating_points"]
  for name, op in sorted(points.items(), key=lambda kv: kv[1]["gflops"]):
    rows.append((f"  {name}", f"{op['spec']}: acc {op['acc@0.5']:.4f}, "
                 f"{op['gflops']:.4f} GFLOPs (x{op['gflops_ratio']:.2f} fewer), "
                 f"{_speedup_text(op)}", "", None))
  if points:
    best = min(points.values(), key=lambda op: op["gflops"])
    rows.append(("early exit realised (best criterion)",
                 f"{best['spec']}: speedup {best['speedup']:.2f}x for x{best['gflops_ratio']:.2f} "
                 f"fewer GFLOPs = {best['realised']:.2f}",
                 f">= {TARGETS['exit_realised']}", best["realised"] >= TARGETS["exit_realised"]))
  overhead = base.get("paired_over_plain")
  if overhead:
    rows.append(("exit path at no exit vs plain sparse eval",
                 f"{overhead['median']:.2f}x median of {overhead['n']} paired ratios (IQR "
                 f"{overhead['q25']:.2f}-{overhead['q75']:.2f}; < 1: the exit machinery costs)",
                 "", None))
  return rows


def group_rows(report: dict) -> list[tuple]:
  """Acc@0.5 per expression group (what the expression names the target by)."""
  rows = []
  for name, group in report.get("acc@0.5_by_group", {}).items():
    target = TARGETS["shape_only_acc"] if name == "shape-only" else None
    rows.append((f"  Acc@0.5 {name} (n={group['count']})", f"{group['acc@0.5']:.4f}",
                 f">= {target}" if target else "",
                 None if target is None else group["acc@0.5"] >= target))
  return rows


def calibrated_exit_rows(calibration: dict) -> list[tuple]:
  """The calibrated exit thresholds (chosen on one split with a risk guarantee) and
  their held-out risk (exact 95 % binomial interval), GFLOPs saving and speedup."""
  held = calibration.get("report", {})
  rows = []
  for name, entry in calibration["criteria"].items():
    label = f"calibrated exit {name} ({calibration['split']} -> {held.get('split', '-')})"
    if entry["threshold"] is None:
      rows.append((label, entry["message"], "", None))
      continue
    r = held.get("criteria", {}).get(name)
    if r is None:
      rows.append((label, entry["spec"], "", None))
      continue
    risk = r["realised_risk"]
    lo, hi = risk["interval"]
    text = (f"{entry['spec']}: {calibration['loss']} {risk['risk']:.4f} ({risk['losses']}/"
            f"{risk['count']}, 95% CI {lo:.4f}-{hi:.4f}), GFLOPs saved {r['gflops_saved']:.1%}")
    if "speedup" in r:
      text += f", {_speedup_text(r)}, realised {r['realised']:.2f}"
    rows.append((label, text, f"risk <= {calibration['eps']:g} w.p. {1 - calibration['delta']:g}",
                 risk["risk"] <= calibration["eps"]))
  overhead = held.get("no_exit_over_plain")
  if overhead:
    rows.append(("  exit path at no exit vs plain sparse eval (test)",
                 f"{overhead['median']:.2f}x median of {overhead['n']} paired ratios (IQR "
                 f"{overhead['q25']:.2f}-{overhead['q75']:.2f})", "", None))
  return rows


def speedup_row(throughput: dict) -> tuple:
  """Measured grouped-sparse vs dense eval samples/s (`bench --throughput`: the
  compiled steps on the same device batches, alternating passes) next to the
  kept-FLOPs ratio."""
  modes = throughput["modes"]
  grouped, bucketed, dense = modes["grouped"], modes["bucketed"], modes["dense"]
  ratio = throughput["kept_flops_ratio"]
  return ("eval samples/s sparse vs dense (model)",
          f"{grouped['samples_per_s']:.0f} vs {dense['samples_per_s']:.0f} = "
          f"{grouped['speedup']:.2f}x (median {grouped['median_speedup']:.2f}x; kept-FLOPs "
          f"ratio {ratio:.2f}x, as-run {throughput['as_run_flops_ratio']:.2f}x; one bucket "
          f"per batch {bucketed['speedup']:.2f}x; {throughput['devices']} device(s))",
          f"speedup >= {TARGETS['speedup_over_flops']} x kept-FLOPs ratio",
          grouped["speedup"] >= TARGETS["speedup_over_flops"] * ratio)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default=CONFIG,
                      help="synthetic config file (defines get_config and SYNTHETIC_SPEC)")
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("--data-dir", default="runs/data")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      help="extra config overrides for training (key=value)")
  args = parser.parse_args()
  t0 = time.perf_counter()
  workdir = os.path.abspath(args.workdir)
  data_dir = os.path.abspath(args.data_dir)
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.abspath(args.config)
  module = config_io.load_config_module(config_path)
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  # Reuse compiled programs across the demo's processes and reruns.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(workdir),
                                                           ".jax_cache"))
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
  timings: dict[str, float] = {}
  common = ["--set", f"data.data_dir={data_dir}"]

  _run("dataset", ["data", "synthetic", "--data-dir", data_dir,
                   "--config", module.SYNTHETIC_SPEC], env, timings)
  train_args = ["train", "--config", config_path, "--workdir", workdir, *common]
  for item in args.overrides:
    train_args += ["--set", item]
  _run("train", train_args, env, timings)
  gallery_dir = os.path.join(workdir, "gallery")
  eval_env = data_parallel_env(env, module.get_config().eval.batch_size)
  eval_json, dense_json, throughput_json = _calibrated_evals(workdir, gallery_dir, common,
                                                             eval_env, timings)
  image, text = _predict_input(workdir, module)
  out_png = os.path.join(workdir, "scan.png")
  predicted = _run("predict", ["predict", "--workdir", workdir, "--image", image, "--text",
                               text, "--out", out_png, *common], env, timings, capture=True)
  blank_json = os.path.join(workdir, "eval_blank.json")
  _run("eval_blank", ["eval", "--workdir", workdir, "--json", blank_json,
                      "--set", "eval.blank_expressions=true", *common], eval_env, timings)
  sweep_dir = os.path.join(workdir, "exit_sweep")
  # One process for the curves and the calibration: each split runs once, the exit
  # path compiles once, and the no-exit pairs are timed once.
  _run("exit", ["eval", "--workdir", workdir, "--split", "validation", "--report-split",
                "test", "--exit-sweep", sweep_dir, "--exit-calibrate", "--risk",
                str(EXIT_RISK), "--delta", str(EXIT_DELTA), "--exit-criteria",
                ",".join(EXIT_HEADS), *common], eval_env, timings)
  total = time.perf_counter() - t0

  report = json.load(open(eval_json))["validation"]
  dense = json.load(open(dense_json))["validation"]
  throughput = json.load(open(throughput_json))
  blank = json.load(open(blank_json))["validation"]
  prediction = json.loads(predicted.strip().splitlines()[-1])
  sweep = json.load(open(os.path.join(sweep_dir, "exit_sweep.json")))
  calibration = json.load(open(os.path.join(workdir, "exit_calibration.json")))
  finest_keep = report["keep_ratio"][-1]
  rows = [
      ("Acc@0.5 (sparse, validation)", f"{report['acc@0.5']:.4f}",
       f">= {TARGETS['acc']:.2f}", report["acc@0.5"] >= TARGETS["acc"]),
      ("Acc@0.5 per scale", " / ".join(f"{a:.3f}" for a in report["acc@0.5_per_scale"]),
       "", None),
      ("mean IoU", f"{report['mean_iou']:.4f}", "", None),
      ("keep ratio per scale", " / ".join(f"{k:.3f}" for k in report["keep_ratio"]),
       f"finest <= {TARGETS['finest_keep']}", finest_keep <= TARGETS["finest_keep"]),
      ("GFLOPs / sample kept / as run / dense",
       f"{report['gflops_kept']:.4f} / {report['gflops_as_run']:.4f} / "
       f"{report['gflops_dense']:.4f}", "", None),
      ("capacity overflow (samples, patches)",
       f"{report['overflow_fraction']:.4f}, {report['patches_dropped']}", "", None),
      speedup_row(throughput),
      ("eval samples/s sparse / dense (eval's own)",
       f"model {report['model_samples_per_s']:.0f} / {dense['model_samples_per_s']:.0f}, "
       f"end to end {report['samples_per_s']:.0f} / {dense['samples_per_s']:.0f}", "", None),
      *group_rows(report),
      ("Acc@0.5 with expressions blanked", f"{blank['acc@0.5']:.4f}",
       f"<= {TARGETS['blank_acc']}", blank["acc@0.5"] <= TARGETS["blank_acc"]),
      *exit_rows(sweep),
      *calibrated_exit_rows(calibration),
      ("expressions evaluated", str(report["count"]), "", None),
      ("predict", f"{text!r} -> {prediction['box']}", "", None),
      ("wall time", f"{total / 60:.1f} min (" + ", ".join(
          f"{k} {v:.0f}s" for k, v in timings.items()) + ")",
       f"<= {TARGETS['minutes']} min", total <= TARGETS["minutes"] * 60),
  ]
  width = max(len(r[0]) for r in rows)
  title = os.path.splitext(os.path.basename(config_path))[0]
  print("\n" + "=" * 78 + f"\nScanFormer demo ({title}, CPU)\n" + "=" * 78)
  for name, value, target, ok in rows:
    mark = "" if ok is None else ("  [ok]" if ok else "  [MISSED]")
    print(f"{name:<{width}}  {value}" + (f"   (target {target}){mark}" if target else ""))
  print(f"\nreports: {eval_json}, {dense_json}, {blank_json}; scan picture: {out_png}; "
        f"gallery: {os.path.join(gallery_dir, 'index.html')}; early-exit curve: "
        f"{os.path.join(sweep_dir, 'exit_sweep.png')}; exit calibration: "
        f"{os.path.join(workdir, 'exit_calibration.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
