"""The evaluation gallery: one static `index.html` with the scan pictures beside it.

No server and no JavaScript: plain HTML with inline CSS, images by relative path, so
the directory can be copied anywhere and opened from disk. At the top the split's
metrics and the per-scale accuracy / keep-ratio table; then three sections chosen
from the per-sample IoUs (`choose_samples`): the worst misses, the best hits and a
seeded random sample of the rest. Each card: the expression, the ground truth and
every scale's box in original pixels, IoUs, keep ratios and the scan picture.

Records are light (no pixels); `load_image(record)` is called only for the chosen
ones, so the caller can keep every sample's record and re-read just a few images.
"""

from __future__ import annotations

import dataclasses
import html
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from data_pipelines.transforms import box_to_original_pixels
from scanformer_jax.visualize.scan_picture import keep_ratios, scale_colour, scan_picture

SECTIONS = (("worst", "Worst misses"), ("best", "Best hits"), ("random", "Random sample"))


@dataclasses.dataclass(frozen=True)
class GalleryRecord:
  """What the gallery shows of one evaluated sample (everything but its pixels)."""
  sample_id: str  # Shown on the card (e.g. the split index).
  expression: str
  meta: Mapping[str, Any]  # This row's letterbox meta (`data_pipelines/contract.py`).
  boxes: np.ndarray  # [S, 4] normalized (cx, cy, w, h) in the frame.
  taken: tuple[np.ndarray, ...]  # per scale [G_s * G_s] bool, row-major.
  gt_box: np.ndarray  # [4] ground truth (x0, y0, x1, y1) in original px.
  iou: np.ndarray  # [S] IoU of each scale's box with the ground truth.
  pred_iou: Optional[np.ndarray] = None  # [S] the IoU head's predictions.


def choose_samples(final_iou: np.ndarray, size: int, seed: int = 0,
                   iou_threshold: float = 0.5) -> dict[str, np.ndarray]:
  """Indices per section (`SECTIONS` keys), disjoint, `size` in all (fewer if N is).

  A third each: the misses with the lowest IoU, the hits with the highest, then a
  random sample (numpy seed `seed`) of what is left fills the rest. Ties keep
  sample order, so the choice is deterministic.
  """
  final_iou = np.asarray(final_iou, np.float64)  # [N]
  n = len(final_iou)
  size = min(size, n)
  share = size // 3
  order = np.argsort(final_iou, kind="stable")  # ascending IoU
  misses = order[final_iou[order] < iou_threshold]
  hits = order[::-1][final_iou[order[::-1]] >= iou_threshold]
  worst = misses[:share]
  best = hits[:share]
  rest = np.setdiff1d(np.arange(n), np.concatenate([worst, best]))
  rng = np.random.default_rng(seed)
  chosen = rng.choice(rest, size=size - len(worst) - len(best), replace=False)
  return {"worst": worst, "best": best, "random": np.sort(chosen)}


# ------------------------------------------------------------------------------ html
_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.5em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #eee; } td.name, th.name { text-align: left; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 0.8em;
        margin: 1em 0; }
.card img { max-width: 100%; height: auto; display: block; margin-top: 0.5em; }
.expr { font-size: 1.15em; font-weight: bold; }
.miss { color: #b00; } .hit { color: #070; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.3em; }
"""


def _e(value: Any) -> str:
  return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
  if isinstance(value, (float, np.floating)):
    return f"{float(value):.4g}"
  return str(value)


def _flat_scalars(summary: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
  """Scalar entries of a (nested) metrics dict as (dotted key, value)."""
  rows = []
  for key, value in summary.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      rows.extend(_flat_scalars(value, f"{name}."))
    elif isinstance(value, (int, float, str, bool, np.integer, np.floating)):
      rows.append((name, value))
  return rows


def _metrics_html(summary: Mapping[str, Any]) -> str:
  rows = "".join(f'<tr><td class="name">{_e(k)}</td><td>{_e(_num(v))}</td></tr>'
                 for k, v in _flat_scalars(summary))
  parts = [f"<table><tr><th class=\"name\">metric</th><th>value</th></tr>{rows}</table>"]
  acc = summary.get("acc@0.5_per_scale")
  keep = summary.get("keep_ratio")
  if acc is not None or keep is not None:
    num = len(acc if acc is not None else keep)
    body = ""
    for s in range(num):
      cells = [f"{100 * float(acc[s]):.1f}%" if acc is not None else "",
               f"{100 * float(keep[s]):.1f}%" if keep is not None else ""]
      body += f"<tr><td class=\"name\">{_swatch(s)}s{s}</td>" + "".join(
          f"<td>{_e(c)}</td>" for c in cells) + "</tr>"
    parts.append("<table><tr><th class=\"name\">scale</th><th>acc@0.5</th>"
                 f"<th>keep ratio</th></tr>{body}</table>")
  return "\n".join(parts)


# The facts a gallery header should give, and how they read.
RUN_FACTS = {"workdir": "workdir", "checkpoint_step": "checkpoint step", "split": "split",
             "model_samples_per_s": "samples/s (model only, compiled, no data loading)"}


def _facts_html(facts: Mapping[str, Any]) -> str:
  rows = "".join(f'<tr><td class="name">{_e(RUN_FACTS.get(k, k))}</td>'
                 f"<td>{_e(_num(v))}</td></tr>"
                 for k, v in facts.items())
  return f"<table>{rows}</table>"


def _swatch(scale: int) -> str:
  r, g, b = scale_colour(scale)
  return f'<span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'


def _box_cells(box: np.ndarray) -> str:
  return "".join(f"<td>{float(v):.1f}</td>" for v in box)


def _card_html(record: GalleryRecord, picture: str, iou_threshold: float) -> str:
  iou = np.asarray(record.iou, np.float64)
  final = float(iou[-1])
  verdict = "hit" if final >= iou_threshold else "miss"
  pixel_boxes = box_to_original_pixels(np.asarray(record.boxes), record.meta)  # [S, 4]
  keep = keep_ratios(record.taken)
  head = ("<tr><th class=\"name\">box (px)</th><th>x0</th><th>y0</th><th>x1</th><th>y1</th>"
          "<th>IoU</th><th>predicted IoU</th><th>keep ratio</th></tr>")
  rows = f"<tr><td class=\"name\">ground truth</td>{_box_cells(record.gt_box)}" \
         "<td></td><td></td><td></td></tr>"
  for s, box in enumerate(pixel_boxes):
    pred = "" if record.pred_iou is None else f"{float(record.pred_iou[s]):.3f}"
    rows += (f"<tr><td class=\"name\">{_swatch(s)}scale {s}</td>{_box_cells(box)}"
             f"<td>{iou[s]:.3f}</td><td>{_e(pred)}</td><td>{100 * keep[s]:.1f}%</td></tr>")
  return (f'<div class="card"><div class="expr">{_e(record.expression)}</div>'
          f'<div>sample {_e(record.sample_id)} · <span class="{verdict}">{verdict}</span>'
          f" · IoU {final:.3f}</div><table>{head}{rows}</table>"
          f'<img src="{_e(picture)}" alt="{_e("scan picture: " + record.expression)}">'
          "</div>")


def write_gallery(out_dir: str | os.PathLike, records: Sequence[GalleryRecord],
                  metrics_summary: Mapping[str, Any],
                  load_image: Callable[[GalleryRecord], np.ndarray], size: int = 24,
                  seed: int = 0, iou_threshold: float = 0.5,
                  title: str = "ScanFormer evaluation",
                  run_facts: Optional[Mapping[str, Any]] = None) -> str:
  """Writes `out_dir/index.html` and one PNG per shown sample; returns the page path.

  Args:
    out_dir: created if missing; earlier `sample_*.png` of the same names are replaced.
    records: every evaluated sample (no pixels).
    metrics_summary: the split's report (`RecMetrics.result()` plus any extras).
    load_image: record -> its original uint8 [H, W, 3] image; called for shown ones only.
    size: how many samples to show in all.
    seed: the random section's numpy seed.
    run_facts: what was evaluated, shown first, in order (`RUN_FACTS` names the usual
      keys: workdir, checkpoint step, split, model-only samples/s).
  """
  os.makedirs(out_dir, exist_ok=True)
  final_iou = np.array([float(np.asarray(r.iou)[-1]) for r in records])  # [N]
  sections = choose_samples(final_iou, size, seed, iou_threshold)
  body = [f"<h1>{_e(title)}</h1>"]
  if run_facts:
    body += ["<h2>Run</h2>", _facts_html(run_facts)]
  body += ["<h2>Metrics</h2>", _metrics_html(metrics_summary)]
  count = 0
  for key, heading in SECTIONS:
    body.append(f"<h2>{_e(heading)} ({len(sections[key])})</h2>")
    if not len(sections[key]):
      body.append("<p>none</p>")
    for index in sections[key]:
      record = records[int(index)]
      picture = f"sample_{count:04d}.png"
      count += 1
      image = scan_picture(load_image(record), record.meta, record.boxes, record.taken,
                           record.expression, gt_box=record.gt_box,
                           pred_iou=record.pred_iou, iou=float(np.asarray(record.iou)[-1]))
      Image.fromarray(image).save(os.path.join(out_dir, picture))
      body.append(_card_html(record, picture, iou_threshold))
  page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
          + "\n".join(body) + "\n</body></html>\n")
  path = os.path.join(out_dir, "index.html")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(page)
  os.replace(tmp, path)
  return path
