"""Inputs a hostile or careless user gives: special files, pickles of shared references,
undecodable query lines, outputs that overwrite inputs, unwritable outputs, odd configs.

Each case must end in a one-line error (or a counted skip, or that line's error in a
batch), promptly: never a hang, a traceback, or a silent wrong answer.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import processing, safe_pickle
from data_pipelines.errors import DataError
from scanformer_jax.errors import UserError


# ------------------------------------------------------------------- special files


def test_shared_references_are_checked_once():
  """25 levels of a list holding its child three times: 3**25 paths, < 1 KB of pickle."""
  node = [{"sent_id": 1, "raw": "the dog"}]
  for _ in range(25):
    node = [node, node, {"k": node}]
  data = pickle.dumps(node, protocol=2)
  assert len(data) < 2500
  assert safe_pickle.loads(data)[0][2]["k"] is not None


def test_a_cycle_is_fine_and_a_deep_chain_is_refused():
  cyclic = [1]
  cyclic.append(cyclic)
  assert safe_pickle.loads(pickle.dumps(cyclic))[1][1][0] == 1
  deep = [0]
  for _ in range(100):
    deep = [deep]
  with pytest.raises(safe_pickle.UnsafePickleError, match="deeper than"):
    safe_pickle.loads(pickle.dumps(deep))


@pytest.mark.parametrize("special", ["/dev/zero", "/dev/urandom", "fifo", "directory"])
def test_special_files_are_not_read_as_images(special, tmp_path):
  if special == "fifo":
    special = tmp_path / "queries.fifo"
    os.mkfifo(special)  # Opening it would wait for a writer forever.
  elif special == "directory":
    special = tmp_path
  elif not os.path.exists(special):
    pytest.skip(f"no {special} here")
  with pytest.raises(DataError, match=f"cannot read image {special}: it is a .*, not a "
                     "regular file"):
    processing.load_image_file(special)


def test_image_files_above_the_size_limit_are_refused(tmp_path):
  path = tmp_path / "photo.png"
  Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(path)
  assert processing.load_image_file(path).shape == (32, 32, 3)
  with pytest.raises(DataError, match=r"photo.png is 0.0 MB, more than the .* MB limit"):
    processing.load_image_file(path, max_bytes=path.stat().st_size - 1)


@pytest.mark.parametrize("content", [
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
    b"the dog on the left\n"])
def test_files_that_are_not_images_name_the_file(content, tmp_path):
  path = tmp_path / "picture.jpg"
  path.write_bytes(content)
  with pytest.raises(DataError) as e:
    processing.load_image_file(path)
  assert str(e.value).startswith(f"bad image {path}: cannot open image: not in an image "
                                 "format")
  assert "BytesIO" not in str(e.value) and "0x" not in str(e.value)
