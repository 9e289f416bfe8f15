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
