"""Synthetic scenes: deterministic, unambiguous expressions, boxes on the drawn shapes."""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np
import pytest

from data_pipelines import synthetic as S
from data_pipelines.transforms import swap_left_right

CFG = S.SceneConfig(image_size=128)


# An independent reading of the grammar (no margins), to check what the generator says.
def _parse_desc(words: list[str]) -> tuple:
  size = next((w for w in words if w in S.SIZES), None)
  color = next((w for w in words if w in S.COLORS), None)
  shape = next((w for w in words if w in S.SHAPES), None)
  return size, color, shape


def _match(o: S.Obj, d: tuple) -> bool:
  return all(v is None or getattr(o, k) == v for k, v in zip(("size", "color", "shape"), d))


def _center(o: S.Obj) -> tuple[float, float]:
  return (o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2


def denote(text: str, objs: list[S.Obj]) -> set[int]:
  words = text.split()
  assert words[0] == "the"
  for rel, (axis, sign) in {"to the left of": (0, 1), "to the right of": (0, -1),
                            "left of": (0, 1), "right of": (0, -1), "above": (1, 1),
                            "below": (1, -1)}.items():
    if f" {rel} the " in text:
      head, tail = text.split(f" {rel} the ", 1)
      anchors = [i for i, o in enumerate(objs) if _match(o, _parse_desc(tail.split()))]
      assert len(anchors) == 1, text
      a = anchors[0]
      return {i for i, o in enumerate(objs) if i != a and _match(o, _parse_desc(head.split()))
              and sign * _center(o)[axis] < sign * _center(objs[a])[axis]}
  pair = {"on the left": ("leftmost"), "on the right": "rightmost",
          "at the top": "topmost", "at the bottom": "bottommost"}
  for k, v in pair.items():
    if text.endswith(k):
      text = "the " + v + " " + text[4:-len(k)]
      words = text.split()
  sup = {"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1)}
  if words[1] in sup:
    axis, sign = sup[words[1]]
    group = [i for i, o in enumerate(objs) if _match(o, _parse_desc(words[2:]))]
    return {max(group, key=lambda i: sign * _center(objs[i])[axis])}
  return {i for i, o in enumerate(objs) if _match(o, _parse_desc(words[1:]))}


def _mirror(objs: list[S.Obj], s: int) -> list[S.Obj]:
  return [dataclasses.replace(o, box=(s - o.box[2], o.box[1], s - o.box[0], o.box[3]))
          for o in objs]


def test_same_seed_same_scene_other_seed_other_scene():
  a, b = S.make_scene(3, "train", 7, CFG), S.make_scene(3, "train", 7, CFG)
  np.testing.assert_array_equal(a.image, b.image)
  assert a.expressions == b.expressions and a.objects == b.objects
  c = S.make_scene(4, "train", 7, CFG)
  d = S.make_scene(3, "validation", 7, CFG)
  assert not np.array_equal(a.image, c.image) and not np.array_equal(a.image, d.image)


def test_expressions_denote_exactly_their_target_also_when_flipped():
  kinds = collections.Counter()
  for i in range(150):
    sc = S.make_scene(0, "train", i, CFG)
    for e in sc.expressions:
      kinds[e.kind] += 1
      assert denote(e.text, sc.objects) == {e.target}, (i, e)
      mirrored = _mirror(sc.objects, CFG.image_size)
      assert denote(swap_left_right(e.text), mirrored) == {e.target}, (i, e)
  assert min(kinds.values()) >= 0.15 * sum(kinds.values()), kinds


def test_scenes_need_the_sentence():
  """Several objects per scene, and the two expressions of a scene differ in target,
  so a predictor that ignores the text is wrong on at least one of them."""
  n_objs, distinct, n = [], 0, 200
  for i in range(n):
    sc = S.make_scene(0, "train", i, CFG)
    n_objs.append(len(sc.objects))
    assert 2 <= len(sc.objects) <= CFG.max_objects
    targets = [e.target for e in sc.expressions]
    distinct += len(targets) == 2 and targets[0] != targets[1]
  assert np.mean(n_objs) >= 3.0
  assert distinct >= 0.9 * n


def test_objects_are_small_and_mostly_background():
  s = CFG.image_size
  cover = []
  for i in range(100):
    sc = S.make_scene(0, "train", i, CFG)
    for o in sc.objects:
      side = o.box[2] - o.box[0]
      assert 0.11 * s <= side <= 0.33 * s
      assert 0 <= o.box[0] and o.box[2] <= s and 0 <= o.box[1] and o.box[3] <= s
    cover.append(sum((o.box[2] - o.box[0]) ** 2 for o in sc.objects) / s**2)
  assert np.mean(cover) < 0.3


def test_object_scale_multiplies_the_sides():
  """`object_scale` grows every object; scenes still hold several separated objects."""
  big = dataclasses.replace(CFG, max_objects=4, object_scale=1.4)
  s, sides, n_objs = big.image_size, [], []
  for i in range(100):
    sc = S.make_scene(0, "train", i, big)
    n_objs.append(len(sc.objects))
    sides += [(o.box[2] - o.box[0]) / s for o in sc.objects]
  lo, hi = (1.4 * v for v in (S.SIZE_RANGE["small"][0], S.SIZE_RANGE["large"][1]))
  assert lo - 0.01 <= min(sides) and max(sides) <= hi + 0.01
  assert min(sides) > 0.16 and max(sides) > 0.4  # both ends really moved
  assert np.mean(n_objs) >= 2.5


def test_shapes_restricts_the_drawn_shapes_and_default_scenes_are_unchanged():
  """`shapes` draws only those shapes, and leaves the default generator's scenes alone
  (cached datasets built before the option keep their content)."""
  two = dataclasses.replace(CFG, max_objects=4, shapes=("square", "triangle"))
  seen, shape_words = collections.Counter(), 0
  for i in range(60):
    sc = S.make_scene(0, "train", i, two)
    seen.update(o.shape for o in sc.objects)
    for e in sc.expressions:
      words = e.text.split()
      shape_words += any(w in S.SHAPES for w in words)
      assert denote(e.text, sc.objects) == {e.target}, e.text
  assert set(seen) == {"square", "triangle"} and min(seen.values()) > 20
  assert shape_words > 20  # shape words still single out objects
  # Fingerprint of the default generator's scenes, taken before `shapes` existed.
  rows = []
  for i in range(20):
    sc = S.make_scene(3, "train", i, CFG)
    rows.append(repr([(o.shape, o.color, o.size, o.box) for o in sc.objects]
                     + [e.text for e in sc.expressions]))
  assert hashlib.sha256("\n".join(rows).encode()).hexdigest() == (
      "98fa1d0206d98bfc7629febf97b05fa328771a14b66725385bc3d4edc1e2d798")


@pytest.mark.parametrize("index", range(8))
def test_box_pixels_have_the_object_colour(index):
  sc = S.make_scene(1, "test", index, CFG)
  for e in sc.expressions:
    o = sc.objects[e.target]
    x0, y0, x1, y1 = o.box
    patch = sc.image[y0:y1, x0:x1].astype(int)  # [h, w, 3]
    close = np.abs(patch - np.array(S.COLORS[o.color])).max(-1) < 30
    fill = {"circle": 0.65, "square": 0.9, "triangle": 0.35, "cross": 0.4}[o.shape]
    assert close.mean() > fill, (o, close.mean())
    # The box is tight: the shape reaches within 2 px of every edge.
    assert close[:3].any() and close[-3:].any() and close[:, :3].any() and close[:, -3:].any()
    # Just outside the box there is no object colour (objects keep a gap).
    ring = np.concatenate([sc.image[max(y0 - 2, 0), x0:x1], sc.image[min(y1 + 1, 127), x0:x1]])
    assert (np.abs(ring.astype(int) - np.array(S.COLORS[o.color])).max(-1) < 30).mean() < 0.1


def test_generate_split_yields_exact_count():
  scenes = list(S.generate_split(0, "validation", 11, S.SceneConfig(image_size=64)))
  assert sum(len(s.expressions) for _, s in scenes) == 11
  assert [i for i, _ in scenes] == list(range(len(scenes)))


def test_scenes_drawn_in_processes_are_the_same_scenes_in_the_same_order():
  cfg = S.SceneConfig(image_size=64)
  count = 3 * S._SCENES_PER_TASK  # Several blocks, the last one cut short.
  one = list(S.generate_split(0, "train", count, cfg))
  two = list(S.generate_split(0, "train", count, cfg, workers=2))
  assert len(one) == len(two) > S._SCENES_PER_TASK
  for (i, a), (j, b) in zip(one, two):
    assert i == j and a.expressions == b.expressions and a.objects == b.objects
    np.testing.assert_array_equal(a.image, b.image)


def test_config_spec_and_kind_weights():
  from data_pipelines import synthetic_builder as SB
  from data_pipelines.errors import DataError
  assert SB.config_from_spec("tiny") is SB.CONFIGS["tiny"]
  c = SB.config_from_spec("train=20000,validation=1000,test=1000,size=128")
  assert c.name == "custom_20000_1000_1000_128px_seed0" and c.kind_weights == (4, 3, 3)
  c = SB.config_from_spec("train=100,size=64,relation=0,max_objects=4")
  assert c.name == "custom_100_1000_1000_64px_seed0_obj4_kinds4-3-0"
  c = SB.config_from_spec("train=100,max_objects=4,object_scale=1.4")
  assert c.name == "custom_100_1000_1000_256px_seed0_obj4_scale1.4"
  assert c.scene_config().object_scale == 1.4
  c = SB.config_from_spec("train=100,shapes=triangle+square")
  assert c.name == "custom_100_1000_1000_256px_seed0_shapes-square-triangle"
  assert c.scene_config().shapes == ("square", "triangle")
  for bad in ("train=x", "colour=3", "max_objects=9", "attribute=0,superlative=0,relation=0",
              "object_scale=2", "object_scale=big", "shapes=", "shapes=star",
              "shapes=square+square"):
    with pytest.raises(DataError):
      SB.config_from_spec(bad)
  only_rel = S.SceneConfig(image_size=64, max_objects=4, kind_probs=(0.0, 0.0, 1.0))
  for _, sc in S.generate_split(0, "train", 40, only_rel):
    assert len(sc.objects) <= 4
    assert all(e.kind == "relation" for e in sc.expressions)


def test_attribute_group_names_what_the_expression_uses():
  groups = S.ATTRIBUTE_GROUPS
  named = {"the red object": "colour-only", "the small object": "size-only",
           "the triangle": "shape-only", "the small red cross": "combined",
           "the large circle": "combined", "the leftmost circle": "spatial",
           "the red object left of the blue square": "spatial"}
  for text, group in named.items():
    assert groups[S.attribute_group(text)] == group, text
  for text in ("", "a dog", "the"):
    assert S.attribute_group(text) == -1
