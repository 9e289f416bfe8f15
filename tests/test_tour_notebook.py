"""experiments/tour.ipynb runs top to bottom (nbclient, a real kernel) at toy sizes."""

import os

import nbformat
from nbclient import NotebookClient

import train_helpers

TOUR = train_helpers.ROOT / "experiments" / "tour.ipynb"


def test_tour_notebook_runs_tiny(tmp_path, monkeypatch):
  out = tmp_path / "tour"
  # The kernel inherits this environment: toy sizes, this source tree, the tests' caches.
  for key, value in train_helpers.subprocess_env({"SCANFORMER_TOUR": "tiny",
                                                  "SCANFORMER_TOUR_DIR": str(out)}).items():
    monkeypatch.setenv(key, value)
  notebook = nbformat.read(str(TOUR), as_version=4)
  assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
      "commit the tour without outputs")
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = {i: cell.outputs for i, cell in enumerate(notebook.cells)
             if cell.cell_type == "code"}
  errors = [o for cell in outputs.values() for o in cell if o.output_type == "error"]
  assert not errors, errors
  images = [o for cell in outputs.values() for o in cell
            if "image/png" in o.get("data", {})]
  assert len(images) == 2  # the scan picture and the early-exit curves
  assert any("Prediction(text=" in o.get("data", {}).get("text/plain", "")
             for cell in outputs.values() for o in cell)
  assert (out / "exit_sweep" / "exit_sweep.json").is_file()
  assert (out / "export" / "run_exported.py").is_file()
  assert sorted(os.listdir(out / "run" / "checkpoints"))
