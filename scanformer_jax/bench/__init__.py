"""`scanformer bench`: one module per benchmark.

model: compiled sparse vs dense inference; train: one train step per path; latency:
batch-1 latency; loop: the training loop of a config against a baseline loop; memory: the train step's compiled bytes and saved residuals.
Timing loops are each benchmark's own (alternating modes, median of steps).
"""

from scanformer_jax.bench.common import MODELS, MODES, ModeResult, bench_config, keep_counts
from scanformer_jax.bench.latency import (LATENCY_MODES, format_latency, latency_buckets,
                                          run_latency)
from scanformer_jax.bench.loop import format_loop, run_loop
from scanformer_jax.bench.memory import format_memory, run_memory
from scanformer_jax.bench.model import format_report, run
from scanformer_jax.bench.train import format_train_report, run_train, train_flops
