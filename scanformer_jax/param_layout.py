"""The parameter tree's layout, and the upgrade of trees saved before `params["backbone"]`.

Older checkpoints kept ViLT's parameters at the top level (`text_embed`, `layers_0`,
...) and the exit heads as `iou_head`, `halt_head`, `uncertainty_head`. `upgrade`
moves them to today's layout (`backbone/...`, `exit_heads/{iou,halt,uncertainty}`);
`check` names the fix in one line when a restore meets the old layout.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from scanformer_jax.errors import UserError

BACKBONE = "backbone"
_OLD_BACKBONE = ("text_embed", "patch_embed", "pos_embed", "modality_embed", "final_norm")
_OLD_HEADS = {"iou_head": "iou", "halt_head": "halt", "uncertainty_head": "uncertainty"}


def _old_backbone_name(name: str) -> bool:
  return name in _OLD_BACKBONE or (name.startswith("layers_") and name[7:].isdigit())


def is_old(top_level: Iterable[str]) -> bool:
  """Whether a params tree with these top-level names has the layout before `backbone`."""
  names = set(top_level)
  return BACKBONE not in names and any(_old_backbone_name(n) for n in names)


def upgrade(params: Mapping[str, Any]) -> dict[str, Any]:
  """An old-layout params tree in today's layout (the same arrays, moved)."""
  if not is_old(params):
    return dict(params)
  out: dict[str, Any] = {BACKBONE: {}}
  for name, tree in params.items():
    if _old_backbone_name(name):
      out[BACKBONE][name] = tree
    elif name in _OLD_HEADS:
      out.setdefault("exit_heads", {})[_OLD_HEADS[name]] = tree
    else:
      out[name] = tree
  return out


def check(top_level: Iterable[str], where: str) -> None:
  """UserError naming the fix when `where` holds an old-layout params tree."""
  if is_old(top_level):
    raise UserError(f"{where} holds parameters in the layout before params['backbone'] "
                    "(top-level 'text_embed', 'layers_0', ...); move them with "
                    "scanformer_jax.param_layout.upgrade(params) and save them again, or "
                    "retrain")
