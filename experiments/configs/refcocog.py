"""RefCOCOg (UMD splits; longer expressions): val / test.

    scanformer data refer --refer-root refer/data --dataset refcocog --split-by umd \
        --image-dir coco/train2014 --data-dir runs/data
    scanformer train --config experiments/configs/refcocog.py --workdir runs/refcocog \
        --set train.init_from=weights/vilt-b32

Data: `refer/refcocog_umd` (catalog build: `--set data.dataset=refcocog_umd`).
Recipe: _vilt_rec.py.
"""

from _vilt_rec import vilt_rec_config  # Sibling module (configs import each other).


def get_config():
  return vilt_rec_config("refer/refcocog_umd", ("validation", "test"))
