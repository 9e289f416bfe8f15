"""Procedural referring-expression scenes: coloured shapes and sentences about them.

Pure numpy + PIL and deterministic from `(seed, split, scene index)`. A scene holds
2-6 non-overlapping objects (shape x colour x size) on a mildly textured grey
background; objects span 12-32 % of the image side, so most of the image is
background. Each expression singles out exactly one object with

  attributes   "the small red circle", "the green object"
  superlatives "the leftmost triangle", "the blue square on the right"
  relations    "the blue square left of the green triangle", "the circle below ..."

and every candidate sentence is checked by a small interpreter (with a margin so
that near-ties are never used): it must denote exactly the target. Scenes reuse a
few colours and shapes, so attributes alone are often not enough and the model has
to read spatial words; left/right words make horizontal flips meaningful.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import itertools
import multiprocessing
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.tokenizer import SPECIAL_TOKENS

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 85, 220),
    "yellow": (235, 205, 35),
    "purple": (150, 60, 195),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
# Object side as a fraction of the image side, per size word.
SIZE_RANGE = {"small": (0.12, 0.18), "large": (0.24, 0.32)}
# Spatial words are only used when the comparison holds by this fraction of the side.
MARGIN = 0.05
KINDS = ("attribute", "superlative", "relation")
SPLITS = {"train": 0, "validation": 1, "test": 2}

_SUPERLATIVE = {"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1),
                "bottommost": (1, 1)}
# "the circle on the left" is used when exactly two objects fit the description.
_PAIR_WORDS = {"leftmost": "on the left", "rightmost": "on the right",
               "topmost": "at the top", "bottommost": "at the bottom"}
# relation text -> (axis, sign): target coordinate * sign < anchor coordinate * sign.
_RELATIONS = {"left of": (0, 1), "to the left of": (0, 1), "right of": (0, -1),
              "to the right of": (0, -1), "above": (1, 1), "below": (1, -1)}


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  image_size: int = 256
  min_objects: int = 2
  max_objects: int = 6
  exprs_per_scene: int = 2  # distinct targets described per scene (at most)
  kind_probs: tuple[float, float, float] = (0.4, 0.3, 0.3)  # KINDS order
  jpeg_quality: int = 92
  object_scale: float = 1.0  # multiplies every SIZE_RANGE (bigger shapes read easier)
  shapes: tuple[str, ...] = SHAPES  # the shapes scenes are drawn with (a subset of SHAPES)


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  color: str
  size: str
  box: tuple[int, int, int, int]  # x0, y0, x1, y1 pixels (x1, y1 exclusive)

  @property
  def center(self) -> tuple[float, float]:
    return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclasses.dataclass(frozen=True)
class Expression:
  text: str
  target: int  # index into the scene's objects
  kind: str  # one of KINDS


@dataclasses.dataclass
class Scene:
  image: np.ndarray  # [S, S, 3] uint8
  objects: list[Obj]
  expressions: list[Expression]


def vocab() -> list[str]:
  """The synthetic vocab: BERT special tokens then every grammar word, sorted."""
  words = {"the", "object"} | set(COLORS) | set(SHAPES) | set(SIZES)
  words |= set(_SUPERLATIVE)
  for text in itertools.chain(_PAIR_WORDS.values(), _RELATIONS):
    words |= set(text.split())
  return list(SPECIAL_TOKENS) + sorted(words)


VOCAB_SIZE = len(vocab())

# What an expression names its target by, for per-group accuracy (`attribute_group`).
ATTRIBUTE_GROUPS = ("colour-only", "size-only", "shape-only", "combined", "spatial")
_ATTRIBUTE_WORDS = (set(COLORS), set(SIZES), set(SHAPES))


def attribute_group(text: str) -> int:
  """Index into ATTRIBUTE_GROUPS of a synthetic expression: one attribute alone, two
  or three together ("combined"), or a superlative/relation ("spatial"); -1 when the
  text is not of the synthetic grammar."""
  words = text.lower().split()
  named = [bool(kind & set(words)) for kind in _ATTRIBUTE_WORDS]  # colour, size, shape
  grammar = set().union(*_ATTRIBUTE_WORDS, {"the", "object"})
  if not any(named) or not set(words) <= set(vocab()):
    return -1
  if not set(words) <= grammar:
    return ATTRIBUTE_GROUPS.index("spatial")
  if sum(named) > 1:
    return ATTRIBUTE_GROUPS.index("combined")
  return named.index(True)


# ------------------------------------------------------------------------- drawing
def _background(rng: np.random.Generator, s: int) -> np.ndarray:
  """Desaturated grey with low-frequency waves and faint noise -> float32 [S, S, 3]."""
  base = (rng.uniform(85, 170) + rng.uniform(-8, 8, size=3)).astype(np.float32)
  u = np.arange(s, dtype=np.float32) / s  # [S]
  tex = np.zeros((s, s), np.float32)
  for _ in range(3):
    theta, freq = rng.uniform(0, np.pi), rng.uniform(1, 5)
    phase, amp = rng.uniform(0, 2 * np.pi), rng.uniform(3, 8)
    ax = 2 * np.pi * freq * np.cos(theta) * u  # [S] along x
    ay = 2 * np.pi * freq * np.sin(theta) * u + phase  # [S] along y
    # sin(ax + ay) as a sum of two outer products (separable, cheap).
    tex += amp * (np.outer(np.cos(ay), np.sin(ax)) + np.outer(np.sin(ay), np.cos(ax)))
  noise = rng.standard_normal((s, s, 3), dtype=np.float32) * 2.5
  return base + tex[..., None] + noise


def _mask(shape: str, side: int) -> np.ndarray:
  """Anti-aliased coverage of a shape filling a side x side box -> float [side, side].

  Drawn 4x supersampled and box-filtered, so the shape touches all four box edges.
  """
  k = 4
  n = side * k
  m = Image.new("L", (n, n), 0)
  d = ImageDraw.Draw(m)
  if shape == "circle":
    d.ellipse((0, 0, n - 1, n - 1), fill=255)
  elif shape == "square":
    d.rectangle((0, 0, n - 1, n - 1), fill=255)
  elif shape == "triangle":
    d.polygon([(n / 2, 0), (0, n - 1), (n - 1, n - 1)], fill=255)
  elif shape == "cross":
    t = n / 3
    d.rectangle((t, 0, n - t - 1, n - 1), fill=255)
    d.rectangle((0, t, n - 1, n - t - 1), fill=255)
  else:
    raise ValueError(shape)
  return np.asarray(m.reduce(k), np.float32) / 255.0


def render_scene(rng: np.random.Generator, objects: list[Obj], s: int) -> np.ndarray:
  """Background plus every object in its flat colour -> uint8 [S, S, 3]."""
  img = _background(rng, s)  # [S, S, 3]
  for o in objects:
    x0, y0, x1, y1 = o.box
    a = _mask(o.shape, x1 - x0)[..., None]  # [side, side, 1]
    patch = img[y0:y1, x0:x1]
    img[y0:y1, x0:x1] = patch * (1 - a) + np.asarray(COLORS[o.color], np.float32) * a
  return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _place_objects(rng: np.random.Generator, cfg: SceneConfig) -> list[Obj]:
  s = cfg.image_size
  n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
  colors = list(rng.choice(list(COLORS), size=int(rng.integers(2, 5)), replace=False))
  num_shapes = min(int(rng.integers(2, 4)), len(cfg.shapes))
  shapes = list(rng.choice(cfg.shapes, size=num_shapes, replace=False))
  gap, edge = int(0.04 * s), max(1, int(0.02 * s))
  objs: list[Obj] = []
  for _ in range(n):
    size = str(rng.choice(SIZES))
    side = int(round(rng.uniform(*SIZE_RANGE[size]) * cfg.object_scale * s))
    for _ in range(100):
      x0 = int(rng.integers(edge, s - edge - side + 1))
      y0 = int(rng.integers(edge, s - edge - side + 1))
      box = (x0, y0, x0 + side, y0 + side)
      if all(box[0] >= o.box[2] + gap or o.box[0] >= box[2] + gap or
             box[1] >= o.box[3] + gap or o.box[1] >= box[3] + gap for o in objs):
        objs.append(Obj(str(rng.choice(shapes)), str(rng.choice(colors)), size, box))
        break
  return objs


# ------------------------------------------------------------------------- language
Desc = tuple  # (size | None, color | None, shape | None)


def _matches(o: Obj, d: Desc) -> bool:
  size, color, shape = d
  return ((size is None or o.size == size) and (color is None or o.color == color)
          and (shape is None or o.shape == shape))


def _desc_text(d: Desc) -> str:
  size, color, shape = d
  return " ".join(w for w in (size, color, shape or "object") if w)


def _descs(o: Obj) -> list[Desc]:
  """Every description of `o` using a non-empty subset of its attributes."""
  out = []
  for use in itertools.product([False, True], repeat=3):
    if any(use):
      out.append(tuple(v if u else None for v, u in zip((o.size, o.color, o.shape), use)))
  return out


def candidates(objs: list[Obj], t: int, s: int,
               rng: np.random.Generator) -> dict[str, list[str]]:
  """All unambiguous expressions for target `t`, by kind."""
  m = MARGIN * s
  target = objs[t]
  out: dict[str, list[str]] = {k: [] for k in KINDS}
  for d in _descs(target):
    group = [i for i, o in enumerate(objs) if _matches(o, d)]
    if group == [t]:
      out["attribute"].append(f"the {_desc_text(d)}")
      continue
    for word, (axis, sign) in _SUPERLATIVE.items():
      others = [sign * objs[i].center[axis] for i in group if i != t]
      if sign * target.center[axis] > max(others) + m:
        out["superlative"].append(f"the {word} {_desc_text(d)}")
        if len(group) == 2:
          out["superlative"].append(f"the {_desc_text(d)} {_PAIR_WORDS[word]}")
    for a, anchor in enumerate(objs):
      if a == t:
        continue
      anchor_descs = [ad for ad in _descs(anchor)
                      if [i for i, o in enumerate(objs) if _matches(o, ad)] == [a]]
      if not anchor_descs:
        continue
      ad = anchor_descs[int(rng.integers(len(anchor_descs)))]
      for rel, (axis, sign) in _RELATIONS.items():
        ac = sign * anchor.center[axis]
        strict = [i for i in group if i != a and sign * objs[i].center[axis] < ac - m]
        lenient = [i for i in group if i != a and sign * objs[i].center[axis] < ac + m]
        if strict == [t] and lenient == [t]:
          out["relation"].append(f"the {_desc_text(d)} {rel} the {_desc_text(ad)}")
  return out


def make_scene(seed: int, split: str, index: int, cfg: SceneConfig) -> Scene:
  """Scene `index` of `split`; the same arguments always give the same scene."""
  rng = np.random.default_rng([seed, SPLITS[split], index])
  s = cfg.image_size
  while True:
    objs = _place_objects(rng, cfg)
    if len(objs) < 2:
      continue
    exprs: list[Expression] = []
    for t in rng.permutation(len(objs)).tolist():
      cands = candidates(objs, t, s, rng)
      kinds = [k for k in KINDS if cands[k] and cfg.kind_probs[KINDS.index(k)] > 0]
      if not kinds:
        continue
      p = np.array([cfg.kind_probs[KINDS.index(k)] for k in kinds])
      kind = str(rng.choice(kinds, p=p / p.sum()))
      texts = sorted(set(cands[kind]))
      exprs.append(Expression(str(texts[int(rng.integers(len(texts)))]), t, kind))
      if len(exprs) == cfg.exprs_per_scene:
        break
    if exprs:
      return Scene(render_scene(rng, objs, s), objs, exprs)


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
  buf = io.BytesIO()
  # 4:4:4 chroma keeps the small coloured shapes crisp.
  Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=0)
  return buf.getvalue()


def generate_split(seed: int, split: str, num_expressions: int, cfg: SceneConfig,
                   workers: int = 1) -> Iterator[tuple[int, Scene]]:
  """(scene index, scene) until exactly `num_expressions` expressions were made.

  Each scene depends only on (seed, split, index), so `workers` > 1 draws blocks of
  consecutive scenes in that many processes: the same scenes in the same order.
  """
  scenes = (_scenes_in_processes(seed, split, cfg, workers) if workers > 1 else
            (make_scene(seed, split, index, cfg) for index in itertools.count()))
  total = 0
  with contextlib.closing(scenes):  # Stops the processes as soon as the split is full.
    for index, scene in enumerate(scenes):
      if total >= num_expressions:
        return
      scene.expressions[:] = scene.expressions[:num_expressions - total]
      total += len(scene.expressions)
      yield index, scene


# Scenes per task when several processes draw a split.
_SCENES_PER_TASK = 128


def _scene_block(seed: int, split: str, start: int, cfg: SceneConfig) -> list[Scene]:
  return [make_scene(seed, split, i, cfg) for i in range(start, start + _SCENES_PER_TASK)]


def _scenes_in_processes(seed: int, split: str, cfg: SceneConfig,
                         workers: int) -> Iterator[Scene]:
  """Scenes 0, 1, 2, ... drawn in `workers` spawned processes, two blocks each in
  flight (spawned: the parent may already run JAX's threads, which fork would copy
  in an undefined state)."""
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    starts = itertools.count(0, _SCENES_PER_TASK)
    pending = collections.deque(pool.submit(_scene_block, seed, split, next(starts), cfg)
                                for _ in range(2 * workers))
    try:
      while True:
        block = pending.popleft().result()
        pending.append(pool.submit(_scene_block, seed, split, next(starts), cfg))
        yield from block
    finally:
      for future in pending:
        future.cancel()
