"""The refer `.p` unpickler admits plain data and refuses code."""

from __future__ import annotations

import os
import pickle

import pytest

from data_pipelines import safe_pickle


def test_plain_refs_load_any_protocol():
  refs = [{"ref_id": 1, "sentences": [{"raw": "man on the left", "sent_id": 3}],
           "split": "train", "bbox": (1.5, 2.0), "tags": {"a", "b"}, "x": None}]
  for proto in (0, 2, pickle.HIGHEST_PROTOCOL):
    assert safe_pickle.loads(pickle.dumps(refs, protocol=proto)) == refs


class _Exploit:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.system, (f"touch {self.path}",))


class _Obj:
  pass


def test_os_system_reduce_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  data = pickle.dumps([{"ref_id": 1}, _Exploit(marker)], protocol=2)
  with pytest.raises(safe_pickle.UnsafePickleError, match="system"):
    safe_pickle.loads(data)
  assert not marker.exists()
  # The same bytes really do run code with the standard unpickler.
  pickle.loads(data)
  assert marker.exists()


@pytest.mark.parametrize("payload", [
    lambda: pickle.dumps(_Obj()),
    lambda: pickle.dumps(eval),
    lambda: b"cbuiltins\neval\n(S'1+1'\ntR.",
    lambda: b"csubprocess\ncheck_output\n((S'ls'\nltR.",
])
def test_other_globals_are_refused(payload):
  with pytest.raises(pickle.UnpicklingError):
    safe_pickle.loads(payload())


def test_load_file(tmp_path):
  p = tmp_path / "refs(unc).p"
  p.write_bytes(pickle.dumps([1, 2.5, "x"], protocol=2))
  assert safe_pickle.load(p) == [1, 2.5, "x"]
