"""Reading foreign weight files into {name: numpy array}, safely.

safetensors is read with `safetensors.numpy` (no torch). Torch files (.bin, .pt,
.ckpt) need torch and are only ever read with `torch.load(weights_only=True)`;
torch is imported inside that branch, never at module import.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


class WeightsError(Exception):
  """A weight file cannot be read; the message says why and what to do."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """One .safetensors file, or the shards named by a `*.safetensors.index.json`."""
  from safetensors.numpy import load_file

  if path.endswith(".index.json"):
    with open(path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for shard in shards:
      out.update(load_file(os.path.join(os.path.dirname(path), shard)))
    return out
  return load_file(path)


# Unpickled container classes of Lightning/sacred checkpoints (hyper-parameters), which
# `weights_only=True` rejects by name. They are read back as plain dicts/lists: the
# allowlist maps the name to the builtin type, so nothing else is ever called.
_CONTAINER_SUFFIXES = {"AttributeDict": dict, "ReadOnlyDict": dict, "ReadOnlyList": list}


def torch_load(path: str) -> Any:
  """`torch.load(path, weights_only=True)` on CPU, with a clear error when it refuses."""
  try:
    import torch
  except ImportError as e:
    raise WeightsError(f"{path} is a torch file and torch is not installed ({e}); "
                       "install the CPU build of torch, or use a model.safetensors") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as first:  # pickle.UnpicklingError, RuntimeError, ...
    try:
      names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
      names = []
    stubs = [(_CONTAINER_SUFFIXES[n.rsplit(".", 1)[-1]], n) for n in names
             if n.rsplit(".", 1)[-1] in _CONTAINER_SUFFIXES]
    others = [n for n in names if n.rsplit(".", 1)[-1] not in _CONTAINER_SUFFIXES]
    if names and not others:
      try:
        with torch.serialization.safe_globals(stubs):
          return torch.load(path, map_location="cpu", weights_only=True)
      except Exception as second:
        first = second
    detail = f"classes it would have to import: {', '.join(others)}" if others else str(first)
    raise WeightsError(
        f"cannot read {path} with torch.load(weights_only=True); {detail.splitlines()[0]}.\n"
        "If you trust the file, extract its state dict once in a separate environment:\n"
        "  python -c \"import torch; c = torch.load('IN.ckpt', map_location='cpu', "
        "weights_only=False); torch.save(c.get('state_dict', c), 'state_dict.pt')\"\n"
        "and convert state_dict.pt instead.") from None


def tensors_to_numpy(state: dict) -> dict[str, np.ndarray]:
  """torch tensors -> numpy (float16/bfloat16 upcast to float32); other values dropped."""
  import torch

  out = {}
  for key, value in state.items():
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      if value.is_floating_point() and value.dtype != torch.float64:
        value = value.float()
      out[key] = value.numpy()
  return out
