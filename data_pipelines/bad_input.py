"""Bad samples: what counts as bad, and the per-epoch counts that get logged.

A sample is bad when its image is unusable (`images`: undecodable, truncated, empty,
too small, too large), its expression is empty (also when it holds only control or
zero-width characters) or not valid Unicode (lone surrogates), or its box is
malformed (NaN, infinite), has zero or negative area, or lies outside the image.
Over-long expressions are not bad: they are truncated to the token budget and
counted (`truncated`). Non-ASCII text is kept: the tokenizer lowercases and strips
accents as BERT does, and characters outside the vocab become [UNK], as in ViLT.

Bad samples are skipped (training) or turned into `valid=False` rows (evaluation),
counted by reason, and the counts are logged once per epoch. If more than
`max_bad_fraction` of the samples seen in an epoch are bad, the pipeline stops with
a `DataError` naming the dataset.
"""

from __future__ import annotations

import logging
import unicodedata

import numpy as np

from data_pipelines.contract import BAD_REASONS
from data_pipelines.errors import DataError

log = logging.getLogger("data_pipelines")

# Boxes may stick out of the image by this many pixels (COCO rounding) before
# they count as "outside the image"; they are clipped to the image.
BOX_TOLERANCE_PX = 1.0


class BadSample(Exception):
  """Raised by a per-sample transform; `reason` is one of BAD_REASONS."""

  def __init__(self, reason: str, detail: str = ""):
    assert reason in BAD_REASONS, reason
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


def check_expression(text: str) -> str:
  """Whitespace-collapsed text without control / format (zero-width) characters,
  which BERT's normalizer drops anyway; BadSample if nothing is left, or if the text
  is not valid Unicode (a lone surrogate: JSON's "\\ud800", or the undecodable bytes
  of a non-UTF-8 command line, which no tokenizer can read)."""
  text = str(text)
  lone = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
  if lone is not None:
    raise BadSample("expression", f"invalid Unicode text (a lone surrogate, U+"
                    f"{ord(text[lone]):04X}, at character {lone + 1}: not UTF-8?)")
  kept = "".join(c for c in str(text)
                 if c.isspace() or unicodedata.category(c) not in ("Cc", "Cf"))
  text = " ".join(kept.split())
  if not text:
    raise BadSample("expression", "empty expression (nothing but whitespace, control or "
                    "zero-width characters)")
  return text


def check_box(box_xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
  """Validates a pixel (x0, y0, x1, y1) box against the image; returns it clipped."""
  box = np.asarray(box_xyxy, np.float64)
  if box.shape != (4,) or not np.all(np.isfinite(box)):
    raise BadSample("box", f"malformed box {box!r}")
  x0, y0, x1, y1 = box
  if x1 - x0 < 0 or y1 - y0 < 0:
    raise BadSample("box", f"box {box.tolist()} has a negative width or height")
  if x1 - x0 == 0 or y1 - y0 == 0:
    raise BadSample("box", f"zero-area box {box.tolist()}")
  t = BOX_TOLERANCE_PX
  if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
    raise BadSample("box", f"box {box.tolist()} outside the {width}x{height} image")
  out = np.array([max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)])
  if out[2] - out[0] <= 0 or out[3] - out[1] <= 0:
    raise BadSample("box", f"box {box.tolist()} has no area inside the image")
  return out


class SkipStats:
  """Counts good/bad/truncated samples per epoch, logs them, enforces the limit."""

  def __init__(self, name: str, max_bad_fraction: float):
    self.name = name
    self.max_bad_fraction = max_bad_fraction
    self.epoch = None  # epoch currently being counted
    self.good = 0
    self.bad = np.zeros(len(BAD_REASONS), np.int64)
    self.truncated = 0
    self.totals = {"good": 0, "truncated": 0, **{r: 0 for r in BAD_REASONS}}

  def update(self, epoch: int, good: int, bad: np.ndarray, truncated: int) -> None:
    # Epochs only move forward; with worker processes a few rows of the previous
    # epoch may arrive late and are counted in the current one.
    if self.epoch is None:
      self.epoch = epoch
    elif epoch > self.epoch:
      self.end_epoch()
      self.epoch = epoch
    self.good += int(good)
    self.bad += np.asarray(bad, np.int64)
    self.truncated += int(truncated)
    self.totals["good"] += int(good)
    self.totals["truncated"] += int(truncated)
    for r, n in zip(BAD_REASONS, np.asarray(bad).tolist()):
      self.totals[r] += int(n)
    # Fail early on a clearly broken dataset instead of at the end of an epoch.
    if self.good + self.bad.sum() >= 1000:
      self._check()

  def state(self) -> dict:
    """The counts as JSON-able values (part of the data iterator's checkpoint), so a
    resumed run logs the whole epoch, not the part after the resume."""
    return {"epoch": self.epoch, "good": self.good, "bad": self.bad.tolist(),
            "truncated": self.truncated, "totals": dict(self.totals)}

  def set_state(self, state: dict) -> None:
    self.epoch = state["epoch"]
    self.good = int(state["good"])
    self.bad = np.asarray(state["bad"], np.int64).reshape(len(BAD_REASONS))
    self.truncated = int(state["truncated"])
    self.totals = {**self.totals, **{k: int(v) for k, v in state["totals"].items()}}

  def _check(self) -> None:
    seen = self.good + int(self.bad.sum())
    if seen and self.bad.sum() / seen > self.max_bad_fraction:
      raise DataError(
          f"{self.name}: {int(self.bad.sum())} of {seen} samples are bad "
          f"({self._reasons()}), more than max_bad_fraction="
          f"{self.max_bad_fraction}. Check the dataset (`scanformer data inspect`) "
          "or raise max_bad_fraction if this is expected.")

  def _reasons(self) -> str:
    return ", ".join(f"{r}: {int(n)}" for r, n in zip(BAD_REASONS, self.bad))

  def end_epoch(self) -> None:
    """Logs this epoch's counts and checks the bad fraction."""
    if self.epoch is None:
      return
    nbad = int(self.bad.sum())
    if nbad or self.truncated:
      log.warning("%s epoch %d: %d samples used, %d bad skipped (%s), %d expressions "
                  "truncated", self.name, self.epoch, self.good, nbad, self._reasons(),
                  self.truncated)
    else:
      log.info("%s epoch %d: %d samples used, none bad", self.name, self.epoch, self.good)
    self._check()
    self.good = 0
    self.bad[:] = 0
    self.truncated = 0
