"""The demo's model and schedule on all four shapes: the open problem the demo leaves.

    python experiments/run_demo.py --config experiments/configs/synthetic_shapes.py --workdir runs/shapes

(or `scanformer data synthetic --config <ALL_SHAPES_SPEC>`, then `scanformer train`
and `scanformer eval` with this config). The same scenes as the demo, drawn with
circles, squares, triangles and crosses, so expressions may need the shape ("the
triangle", "the small red cross"). With the demo's recipe the tiny model learns the
colour and size words but not shape: see experiments/README.md for what was tried.
Start here to make a from-scratch model learn shape within a CPU budget.
"""

import dataclasses

import synthetic_tiny  # Sibling module (configs import each other).
from data_pipelines import synthetic_builder

SYNTHETIC_SPEC = synthetic_tiny.ALL_SHAPES_SPEC
DATASET = synthetic_builder.dataset_name(SYNTHETIC_SPEC)


def get_config():
  config = synthetic_tiny.get_config()
  return config.replace(data=dataclasses.replace(config.data, dataset=DATASET))
