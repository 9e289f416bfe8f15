"""ReferItGame (refclef, Berkeley splits): test.

    scanformer data refer --refer-root refer/data --dataset refclef --split-by berkeley \
        --image-dir saiapr_tc-12 --data-dir runs/data
    scanformer train --config experiments/configs/referit.py --workdir runs/referit \
        --set train.init_from=weights/vilt-b32

Recipe: _vilt_rec.py.
"""

from _vilt_rec import vilt_rec_config  # Sibling module (configs import each other).


def get_config():
  return vilt_rec_config("refer/refclef_berkeley", ("test",))
