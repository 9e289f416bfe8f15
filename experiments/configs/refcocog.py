"""RefCOCOg (UMD splits; longer expressions): val / test.

    scanformer train --config experiments/configs/refcocog.py --workdir runs/refcocog \
        --set train.init_from=~/vilt_b32 --set data.vocab_path=~/vilt_b32/vocab.txt

Data: `refcocog_umd` (catalog) or `refer/refcocog_umd`. Recipe: _vilt_rec.py.
"""

from _vilt_rec import vilt_rec_config  # Sibling module (configs import each other).

NUM_TRAIN_EXPRESSIONS = 80_512  # RefCOCOg umd train


def get_config():
  return vilt_rec_config("refcocog_umd", ("validation", "test"), NUM_TRAIN_EXPRESSIONS)
