"""Model hyperparameters: one frozen, hashable dataclass usable as a jit static argument."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """ScanFormer architecture (DESIGN.md section 2).

  The defaults are ViLT-B/32 (`vilt_b32()`); `tiny()` is a CPU-sized model for tests
  and the synthetic demo. Every choice the paper leaves open is a field here.
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
  # Early-exit head: predicts the IoU of each scale's box (DESIGN.md section 4).
  iou_head: bool = False
  # Compute dtype ("float32" or "bfloat16"); parameters are always float32.
  dtype: str = "float32"
  initializer_range: float = 0.02
  # Initial patch position grid: "normal" (N(0, initializer_range), as ViLT) or
  # "sincos" (2-D sin-cos, a strong position signal from step 0: much faster when
  # training from scratch; irrelevant when ViLT weights are loaded).
  pos_embed_init: str = "normal"

  def __post_init__(self):
    sizes = self.image_sizes
    if not sizes:
      raise ValueError("image_sizes must name at least one scale")
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
    if self.select_topk is not None and self.select_rule not in ("threshold", "topk"):
      raise ValueError(f"select_topk selects the 'topk' rule, but select_rule is "
                       f"{self.select_rule!r}: set one of them")

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
