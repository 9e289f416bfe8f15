"""ReferItGame (refclef, Berkeley splits): test.

    scanformer data refer --refer-root R --dataset refclef --split-by berkeley \
        --image-dir I --data-dir ~/tensorflow_datasets
    scanformer train --config experiments/configs/referit.py --workdir runs/referit \
        --set train.init_from=~/vilt_b32 --set data.vocab_path=~/vilt_b32/vocab.txt

Recipe: _vilt_rec.py.
"""

from _vilt_rec import vilt_rec_config  # Sibling module (configs import each other).

NUM_TRAIN_EXPRESSIONS = 54_127  # refclef berkeley train


def get_config():
  return vilt_rec_config("refer/refclef_berkeley", ("test",), NUM_TRAIN_EXPRESSIONS)
