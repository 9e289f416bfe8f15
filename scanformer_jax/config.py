"""Every config dataclass: the model (a jit static argument) and the experiment sections.

Frozen, hashable and free of I/O: jit-side modules import them from here. Reading
config files, `--set` overrides and config.json live in `config_io.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax.numpy as jnp

from scanformer_jax.errors import UserError


def _check_number(key: str, value: Any, low: float = 0.0, high: float = math.inf,
                  low_open: bool = False) -> None:
  """A UserError naming `key` unless `value` is finite and in range."""
  ok = isinstance(value, (int, float)) and math.isfinite(value) and (
      value > low if low_open else value >= low) and value <= high
  if not ok:
    bound = f"> {low:g}" if low_open else f">= {low:g}"
    if high != math.inf:
      bound += f" and <= {high:g}"
    finite = "" if isinstance(value, int) else "finite and "
    raise UserError(f"{key}={value!r} must be {finite}{bound}")


def _check_numbers(section: str, config: Any, low: float = 0.0, **ranges) -> None:
  """Every int/float field of `config` (and of its tuples) finite and >= `low`;
  `ranges` gives other (low[, high[, low_open]]) bounds per field name. Config
  mistakes are the user's, so this raises UserError (one line, naming the key)."""
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if field.name in ranges:
      _check_number(f"{section}.{field.name}", value, *ranges[field.name])
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      _check_number(f"{section}.{field.name}", value, low)
    elif isinstance(value, tuple):
      for i, v in enumerate(value):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          _check_number(f"{section}.{field.name}[{i}]", v, low)


REMAT_MODES = ("none", "layer", "dots")

# Config keys that were renamed: the old key is refused with one line naming the new.
RENAMED_KEYS = {
    "train.capacity": "train.slots",
    "model.iou_head": "model.exit_heads (e.g. model.exit_heads='(\"iou\",)')",
    "model.halt_head": "model.exit_heads (e.g. model.exit_heads='(\"halt\",)')",
    "model.uncertainty_head": "model.exit_heads (e.g. model.exit_heads='(\"uncertainty\",)')",
    "loss.iou_weight": "loss.exit_head_weights (e.g. '((\"iou\", 1.0),)')",
    "loss.halt_weight": "loss.exit_head_weights (e.g. '((\"halt\", 1.0),)')",
    "loss.uncertainty_weight": "loss.exit_head_weights (e.g. '((\"uncertainty\", 1.0),)')",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """ScanFormer architecture (DESIGN.md section 2).

  The defaults are ViLT-B/32 (`vilt_b32()`); `tiny()` is a CPU-sized model for tests
  and the synthetic demo. Every choice DESIGN.md fixes without the
  write-up's word (the paper's exact value is not verified here) is a field here.
  """

  # Text (BERT-uncased embeddings, as ViLT).
  vocab_size: int = 30522
  max_text_len: int = 40
  type_vocab_size: int = 2  # BERT token types inside the text embedding.
  # Shared transformer.
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  layer_norm_eps: float = 1e-12
  # Image pyramid, coarse to fine; each size twice the previous.
  image_sizes: tuple[int, ...] = (128, 256, 512)
  patch_size: int = 32
  # Side of ViLT's learned patch position grid (ViLT: 384 / 32 = 12); interpolated
  # bilinearly (align_corners=True) to each scale's grid.
  pos_grid_size: int = 12
  # Layers [0, encoder1_layers) are Encoder1 (selection head after them).
  encoder1_layers: int = 6
  # Static token budget of the sparse path per scale (None: all patches).
  capacity: Optional[tuple[int, ...]] = None
  # Capacity buckets per scale (ascending; scale 0: its patch count): the sparse scan
  # runs each scale s >= 1 with the smallest bucket that holds a group's largest
  # wanted count (chosen inside jit, one compile; the last bucket if none does).
  # Overrides `capacity` when set; `scanformer calibrate` writes both.
  capacity_buckets: Optional[tuple[tuple[int, ...], ...]] = None
  # With buckets: a batch's rows (each device's own) are sorted by wanted count and
  # cut into groups of about this many consecutive rows, each with its own bucket, so
  # a batch pays about what its rows need, not its neediest row's count for every
  # row. Fewer rows per group: closer to each row's need, but smaller matmuls (on an
  # accelerator, try more rows). None: the whole batch is one group.
  capacity_group_rows: Optional[int] = 16
  # Inference selection rule, a name registered in selection.py (`selection.RULES`):
  # "threshold" or "topk"; setting select_topk selects "topk". Training samples
  # Gumbel decisions instead.
  select_rule: str = "threshold"
  # "threshold": a child block is taken iff sigmoid(parent logit) > select_threshold.
  select_threshold: float = 0.5
  # "topk", fixed-count selection (benchmarks, ablations): at scale s >= 1 take
  # exactly the top `select_topk[s]` candidates by parent logit.
  select_topk: Optional[tuple[int, ...]] = None
  # Gumbel-sigmoid temperature for training.
  tau: float = 1.0
  # Box head MLP depth (hidden layers of width hidden_size, then 4 outputs).
  box_head_layers: int = 3
  # Training selection rule, a name registered with `@selection.train_rule`: hard
  # 0/1 decisions with a straight-through gradient ("gumbel": hard Gumbel-sigmoid).
  train_select_rule: str = "gumbel"
  # Early-exit heads on each REG_s, by name (exit_heads.py registry; early_exit.py
  # criteria read their signals), none by default: "iou" predicts the IoU of the
  # scale's box (DESIGN.md section 4), "halt" the probability that the box is already
  # correct (IoU >= 0.5), "uncertainty" a Laplace scale per box coordinate.
  exit_heads: tuple[str, ...] = ()
  # The exit heads read stop_gradient(REG): their losses train only the heads, so
  # switching a head on does not change the grounding model (tests/test_exit_heads.py).
  exit_heads_stop_gradient: bool = True
  # Compute dtype ("float32" or "bfloat16"); parameters are always float32.
  dtype: str = "float32"
  initializer_range: float = 0.02
  # Initial patch position grid: "normal" (N(0, initializer_range), as ViLT) or
  # "sincos" (2-D sin-cos, a strong position signal from step 0: much faster when
  # training from scratch; irrelevant when ViLT weights are loaded).
  pos_embed_init: str = "normal"
  # Rematerialisation of the encoder layers in the backward pass: "none" (save every
  # activation), "layer" (save each layer's input only, recompute the rest) or "dots"
  # (save matmul outputs only). Same values and gradients; less memory, more compute.
  remat: str = "none"

  def __post_init__(self):
    positive = ("vocab_size", "max_text_len", "type_vocab_size", "hidden_size", "num_layers",
                "num_heads", "mlp_dim", "patch_size", "pos_grid_size")  # 0 divides or empties.
    _check_numbers("model", self, **{name: (1,) for name in positive},
                   layer_norm_eps=(0.0, math.inf, True), tau=(0.0, math.inf, True),
                   select_threshold=(0.0, 1.0))
    sizes = self.image_sizes
    if not sizes:
      raise ValueError("image_sizes must name at least one scale")
    _check_number("model.image_sizes[0]", sizes[0], self.patch_size)
    for small, big in zip(sizes, sizes[1:]):
      if big != 2 * small:
        raise ValueError(f"each image size must be twice the previous: {sizes}")
    if sizes[0] % self.patch_size:
      raise ValueError(f"image size {sizes[0]} is not a multiple of patch {self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError("hidden_size must be divisible by num_heads")
    if not 0 < self.encoder1_layers <= self.num_layers:
      raise ValueError("encoder1_layers must be in [1, num_layers]")
    if self.pos_embed_init not in ("normal", "sincos"):
      raise ValueError(f"pos_embed_init must be normal or sincos, got {self.pos_embed_init}")
    if self.remat not in REMAT_MODES:
      raise ValueError(f"remat must be one of {REMAT_MODES}, got {self.remat!r}")
    if len(set(self.exit_heads)) != len(self.exit_heads):
      raise ValueError(f"exit_heads names a head twice: {self.exit_heads}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype}")
    for name in ("capacity", "select_topk"):
      value = getattr(self, name)
      if value is None:
        continue
      if len(value) != self.num_scales:
        raise ValueError(f"{name} needs one entry per scale ({self.num_scales}): {value}")
      for s, (count, total) in enumerate(zip(value, self.num_patches)):
        if not 0 <= count <= total:
          raise ValueError(f"{name}[{s}]={count} outside [0, {total}]")
    if self.capacity is not None and self.capacity[0] != self.num_patches[0]:
      raise ValueError("scale 0 takes every patch: capacity[0] must equal its patch count")
    if self.capacity_buckets is not None:
      self._check_buckets(self.capacity_buckets)
    if self.capacity_group_rows is not None:
      _check_number("model.capacity_group_rows", self.capacity_group_rows, 1)
    if self.select_topk is not None and self.select_rule not in ("threshold", "topk"):
      raise ValueError(f"select_topk selects the 'topk' rule, but select_rule is "
                       f"{self.select_rule!r}: set one of them")

  def _check_buckets(self, buckets) -> None:
    if len(buckets) != self.num_scales:
      raise ValueError(f"capacity_buckets needs one tuple per scale ({self.num_scales}): "
                       f"{buckets}")
    for s, (sizes, total) in enumerate(zip(buckets, self.num_patches)):
      if not sizes or list(sizes) != sorted(set(sizes)):
        raise ValueError(f"capacity_buckets[{s}]={sizes} must be strictly ascending and "
                         "non-empty")
      if not 1 <= sizes[0] <= sizes[-1] <= total:
        raise ValueError(f"capacity_buckets[{s}]={sizes} outside [1, {total}]")
    if tuple(buckets[0]) != (self.num_patches[0],):
      raise ValueError(f"scale 0 takes every patch: capacity_buckets[0] must be "
                       f"({self.num_patches[0]},), got {buckets[0]}")

  # Derived, static quantities.
  @property
  def num_scales(self) -> int:
    return len(self.image_sizes)

  @property
  def grid_sizes(self) -> tuple[int, ...]:
    return tuple(size // self.patch_size for size in self.image_sizes)

  @property
  def num_patches(self) -> tuple[int, ...]:
    return tuple(g * g for g in self.grid_sizes)

  @property
  def capacities(self) -> tuple[int, ...]:
    return self.capacity if self.capacity is not None else self.num_patches

  @property
  def max_capacities(self) -> tuple[int, ...]:
    """Slots of each scale's largest run: the last bucket, else `capacities`."""
    if self.capacity_buckets is not None:
      return tuple(sizes[-1] for sizes in self.capacity_buckets)
    return self.capacities

  @property
  def selection_rule(self) -> str:
    """The inference selection rule: "topk" whenever select_topk is set."""
    return "topk" if self.select_topk is not None else self.select_rule

  @property
  def image_size(self) -> int:
    """The finest scale: model input images are [B, image_size, image_size, 3]."""
    return self.image_sizes[-1]

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def tiny(cls, **overrides) -> "ModelConfig":
    """CPU-sized: hidden 128, 4 layers, scales 32/64/128 px, patch 16."""
    base = dict(
        hidden_size=128, num_layers=4, num_heads=4, mlp_dim=512, encoder1_layers=2,
        image_sizes=(32, 64, 128), patch_size=16, pos_grid_size=8, max_text_len=24,
        vocab_size=512, box_head_layers=2,
    )
    base.update(overrides)
    return cls(**base)

  @classmethod
  def vilt_b32(cls, **overrides) -> "ModelConfig":
    """DESIGN.md defaults: ViLT-B/32 backbone, scales 128/256/512, 6 + 6 layers."""
    return cls(**overrides)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which dataset and how to read it (data_pipelines/pipeline.py, sources.py)."""

  # "synthetic[/<config>]", "refcoco_unc" (catalog ref_coco), "refer/refclef_berkeley",
  # ... (data_pipelines/sources.py), or "fake" (generated in memory, for tests).
  dataset: str = "synthetic"
  # Where the built TFDS datasets live (a local path or gs://...).
  data_dir: str = "~/tensorflow_datasets"
  # BERT-uncased vocab.txt; None: the synthetic dataset's own vocab.
  vocab_path: Optional[str] = None
  train_split: str = "train"
  eval_splits: tuple[str, ...] = ("validation",)
  # Training augmentation (random scale/crop, flip with left/right swap, colour jitter).
  augment: bool = True
  # grain worker processes per host (None: the pipeline's default for this machine).
  # The batch order depends on it: keep it fixed when resuming.
  worker_count: Optional[int] = None
  # Fail when more than this fraction of samples is bad (undecodable, empty, ...).
  max_bad_fraction: float = 0.01
  # Shuffling and augmentation seed.
  seed: int = 0
  # Process the train split once (decode, letterbox, tokenize) into uint8 arrays at the
  # model's frame size under <data_dir>/ready/, built on first use, and train from
  # those memory-mapped rows: without augmentation every epoch repeats the same
  # per-sample work, which otherwise costs a share of the CPU the train step needs.
  # Same batches as the decoding pipeline. Needs augment=False; one array row per
  # expression (N * R * R * 3 bytes on disk), so meant for small sets like the demo's.
  ready_rows: bool = False

  def __post_init__(self):
    _check_numbers("data", self, max_bad_fraction=(0.0, 1.0))
    if self.ready_rows and self.augment:
      raise UserError("data.ready_rows=True stores every sample processed once, which "
                      "needs data.augment=False (augmentation redraws each epoch)")
    if not self.eval_splits:
      raise UserError("data.eval_splits is empty: name at least one split to evaluate "
                      "(e.g. validation)")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """DESIGN.md section 4: per-scale L1 + GIoU, keep-ratio and early-exit terms."""

  l1_weight: float = 5.0
  giou_weight: float = 2.0
  # Weight w_s of each scale's box loss; None: 1 for every scale.
  scale_weights: Optional[tuple[float, ...]] = None
  # Target fraction of patches taken at each scale (scale 0 is ignored: all taken).
  # Per-scale keep-ratio targets (scale 0 reads every patch). These keep about a third
  # of all patches per sample (16 + 0.5 * 64 + 0.25 * 256 = 112 of 16 + 64 + 256 = 336
  # at 128/256/512 px and patch 32: 33%); the article's one figure is about 65% selected
  # per sample, so the shipped targets scan more sparsely than it reports. The paper's
  # exact targets are not verified here.
  target_ratio: tuple[float, ...] = (1.0, 0.5, 0.25)
  ratio_weight: float = 2.0
  # Weights of the exit heads' loss terms by head name, e.g. (("halt", 2.0),); a head
  # not named here weighs its registry entry's `weight` (1 for the built-in heads).
  exit_head_weights: tuple[tuple[str, float], ...] = ()
  # Auxiliary, not in DESIGN.md's objective (0 = that objective): binary cross-entropy
  # teaching each scale's selection logits which patches overlap the ground-truth
  # box. A dense grounding signal that speeds up training from scratch and makes
  # the scan zoom into the referred object.
  select_weight: float = 0.0

  def __post_init__(self):
    _check_numbers("loss", self)
    for i, pair in enumerate(self.exit_head_weights):
      if (not isinstance(pair, (tuple, list)) or len(pair) != 2
          or not isinstance(pair[0], str)):
        raise UserError(f"loss.exit_head_weights[{i}]={pair!r} must be a (head name, weight) "
                        "pair")
      _check_number(f"loss.exit_head_weights[{i}]", pair[1])

  def exit_head_weight(self, name: str, default: float) -> float:
    """The loss weight of exit head `name` (`default`: its registry entry's)."""
    return dict(self.exit_head_weights).get(name, default)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW, linear warmup then cosine decay; backbone and new parameters apart."""

  learning_rate: float = 1e-4  # New parameters: REG, scale/constant tokens, heads.
  backbone_learning_rate: float = 1e-5  # Pretrained ViLT layers and embeddings.
  warmup_steps: int = 1000
  # Warmup in epochs of the train split instead: `scanformer train` sets warmup_steps
  # to floor(warmup_epochs * train expressions / train.batch_size), at least 1,
  # counting the built split (an explicit --set optim.warmup_steps wins). None: off.
  warmup_epochs: Optional[float] = None
  # Learning rate at the end of the cosine, as a fraction of the peak.
  end_lr_fraction: float = 0.0
  weight_decay: float = 1e-4
  b1: float = 0.9
  b2: float = 0.999
  grad_clip_norm: float = 1.0

  def __post_init__(self):
    _check_numbers("optim", self, end_lr_fraction=(0.0, 1.0), b1=(0.0, 1.0),
                   b2=(0.0, 1.0))


# `train.init_from` placeholder of configs whose backbone is meant to be pretrained.
INIT_FROM_REQUIRED = "required: set train.init_from"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  num_steps: int = 100_000
  # Length in epochs of the train split instead: `scanformer train` sets num_steps to
  # floor(num_epochs * train expressions / batch_size), counting the built split (an
  # explicit --set train.num_steps wins). None: num_steps as given.
  num_epochs: Optional[float] = None
  batch_size: int = 128  # Global, over all processes and devices.
  log_every: int = 100
  seed: int = 0  # Parameter init and Gumbel noise; the data seed is data.seed.
  # Initial backbone weights: a directory written by `scanformer convert-vilt`; None
  # (`--set train.init_from=none`) trains from scratch. INIT_FROM_REQUIRED (the ViLT
  # configs) refuses to train until one of the two is chosen explicitly.
  init_from: Optional[str] = None
  # With init_from: every REG_s starts from ViLT's pretrained image [CLS] token
  # (vilt.init_scanformer_from_vilt) instead of random values.
  init_reg_from_vilt_cls: bool = False
  # Steps at the start that take every patch (no Gumbel masks): the box heads learn
  # from clean inputs while the selection head learns from loss.select_weight alone.
  # 0 (the paper) samples hard Gumbel selections from the first step. In the sparse
  # path these steps run the dense program (every patch cannot fit the capacities;
  # its own compiled program, chosen on the host), so they cost what a dense step costs.
  select_warmup_steps: int = 0
  # Gradient accumulation: each device's rows of the global batch run as this many
  # microbatches inside the step (summed gradients; the same update as 1, for less
  # activation memory). train.batch_size must divide by microbatches x devices.
  microbatches: int = 1
  # Optimizer steps per compiled call: a `lax.scan` over this many batches, so the
  # host dispatches, transfers and checks once per call (the same updates as single
  # steps). The step count, log, eval, checkpoint and warm-up steps must be
  # multiples of it; a signal is acted on at the end of a call.
  steps_per_call: int = 1
  # Global batches a background thread keeps in flight to the devices (prefetch.py),
  # so the host never waits on a transfer; 0: transfer on the main thread.
  device_prefetch: int = 2
  # Stop (without saving) after this many consecutive steps with a non-finite loss
  # or gradient: the run has diverged. 0: never stop.
  max_consecutive_skipped: int = 10
  # Multi-process runs agree on a SIGTERM/SIGINT every this many steps (a host-side
  # collective), then every process saves that step and stops. 1: the agreement
  # (4 ms mean between 2 CPU processes) is 0.15 % of a vilt_b32 batch-1 train step.
  preemption_check_every: int = 1
  # The training forward: "dense" (every patch a token) or "sparse" (the Gumbel-taken
  # patches in `slots` slots plus one merged token: the same loss and gradients
  # for a cost that falls with the patches kept; model.py says why they are equal).
  path: str = "dense"
  # Sparse path: static slots per scale (scale 0: every patch). Patches taken beyond
  # them are replaced, lowest parent logits first, and counted (metric dropped_s<k>).
  # None: ceil(1.5 * loss.target_ratio[s] * N_s) rounded up to a multiple of 8,
  # at most N_s (`sparse_slots`).
  slots: Optional[tuple[int, ...]] = None

  def __post_init__(self):
    _check_numbers("train", self, num_steps=(1,), batch_size=(1,), log_every=(1,),
                   microbatches=(1,))
    if self.path not in ("dense", "sparse"):
      raise ValueError(f"path must be dense or sparse, got {self.path!r}")

  def sparse_slots(self, model: ModelConfig, loss: LossConfig) -> tuple[int, ...]:
    """The sparse path's slots per scale: `slots`, or the default from the targets."""
    if self.slots is not None:
      capacity = tuple(self.slots)
    else:
      if len(loss.target_ratio) != model.num_scales:
        raise ValueError(f"loss.target_ratio needs {model.num_scales} entries, "
                         f"got {loss.target_ratio}")
      capacity = tuple(min(n, 8 * math.ceil(math.ceil(1.5 * ratio * n) / 8))
                       for ratio, n in zip(loss.target_ratio, model.num_patches))
      capacity = (model.num_patches[0],) + capacity[1:]
    if len(capacity) != model.num_scales:
      raise ValueError(f"train.slots needs one entry per scale ({model.num_scales}), "
                       f"got {capacity}")
    for s, (count, total) in enumerate(zip(capacity, model.num_patches)):
      if not 1 <= count <= total:
        raise ValueError(f"train.slots[{s}]={count} outside [1, {total}] (the patches "
                         f"of scale {s})")
    if capacity[0] != model.num_patches[0]:
      raise ValueError(f"train.slots[0] must be {model.num_patches[0]}: scale 0 takes "
                       "every patch")
    return capacity


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  batch_size: int = 64  # Global.
  iou_threshold: float = 0.5
  # Evaluate the validation split(s) every K training steps (0: only via `eval`).
  every_steps: int = 0
  # Early-exit criterion reported next to the full scan, by name (early_exit.py
  # registry), e.g. "iou_head:0.8" (needs the "iou" exit head) or "last_scale"; None: no
  # early-exit report.
  exit_criterion: Optional[str] = None
  # The exit-aware scan (exit_scan.py, `eval --exit-sweep`): after each scale the
  # samples still scanning are compacted into the smallest sub-batch of
  # ceil(f * eval.batch_size) rows, f in this tuple, that holds them (or skipped when
  # none is left). A largest fraction below 1 caps the sub-batch: the samples beyond
  # it stop early and are counted as forced exits.
  exit_sub_batches: tuple[float, ...] = (0.25, 0.5, 1.0)
  # Ablation: replace every expression by "[CLS] [SEP]" (how much does the model
  # need the sentence?).
  blank_expressions: bool = False
  # The faster inference plan per batch size, measured by `scanformer calibrate` on the
  # model's own selection: (batch size, "sparse" or "dense", bucketed sparse ms, dense
  # ms[, sparse ready s, dense ready s]) per timed batch (capacity.Plan). `eval` and
  # `predict` (and `load()`) run the plan recorded for the batch size nearest theirs
  # (capacity.plan_for); empty: the sparse path.
  plans: tuple[tuple[Any, ...], ...] = ()

  def __post_init__(self):
    _check_numbers("eval", self, batch_size=(1,), iou_threshold=(0.0, 1.0, True))
    for i, fraction in enumerate(self.exit_sub_batches):
      _check_number(f"eval.exit_sub_batches[{i}]", fraction, 0.0, 1.0, True)
    if not self.exit_sub_batches:
      raise UserError("eval.exit_sub_batches needs at least one fraction in (0, 1]")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  # Where checkpoints go; None: <workdir>/checkpoints. Multi-host runs need a
  # directory every host can write, e.g. gs://bucket/runs/name/checkpoints.
  directory: Optional[str] = None
  every_steps: int = 1000
  max_to_keep: int = 3
  async_save: bool = True
  # A save is refused as divergence when the parameter norm exceeds this many times
  # the norm of the last checkpoint (or of the start); 0: no bound.
  max_param_norm_growth: float = 10.0

  def __post_init__(self):
    _check_numbers("checkpoint", self, every_steps=(1,), max_to_keep=(1,))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh `(data, fsdp)`; the batch is split over both axes.

  `data=-1` takes every device not used by `fsdp`. With `fsdp > 1`, parameters (and
  optimizer moments) of at least `fsdp_min_size` elements are sharded on their largest
  divisible axis. `distributed=True` calls `jax.distributed.initialize` (on Cloud TPU
  and SLURM it finds its peers itself; elsewhere set the three fields below).
  """

  data: int = -1
  fsdp: int = 1
  fsdp_min_size: int = 2**18
  distributed: bool = False
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None

  def __post_init__(self):
    if self.data != -1:
      _check_number("mesh.data", self.data, 1)
    _check_number("mesh.fsdp", self.fsdp, 1)
    _check_number("mesh.fsdp_min_size", self.fsdp_min_size, 0)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  loss: LossConfig = LossConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  eval: EvalConfig = EvalConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  mesh: MeshConfig = MeshConfig()
  # Python files or module names imported before the run (plugins.py): they register
  # criteria, selection rules, exit heads and datasets. Saved in config.json, so every
  # later command on the workdir imports them again.
  plugins: tuple[str, ...] = ()

  def replace(self, **changes) -> "ExperimentConfig":
    return dataclasses.replace(self, **changes)
