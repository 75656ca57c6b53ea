"""Rotary position embedding's tables: the angle of each rotated pair at each position.

An architecture computes its `Rope` from its file's keys (DeepSeek2's YaRN scaling in
hybrid/models/deepseek2.py); the model (hybrid/model.py) keeps `rope_cos_sin` of every
position as one table, of which each ROPE op reads its tokens' rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rope:
    freq: torch.Tensor      # [n_rot/2] angle per position of each rotated pair
    mag: float              # magnitude llama.cpp's rope multiplies cos/sin by (YaRN mscale)
    kq_scale: float         # softmax scale of the attention (YaRN's mscale^2 / sqrt(head_k))


def rope_cos_sin(pos: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, n_rot/2] (times the YaRN magnitude) of each pair's angle at positions pos [T]."""
    ang = pos.to(torch.float64)[:, None] * rope.freq.to(pos.device, torch.float64)[None, :]
    return (torch.cos(ang) * rope.mag).float(), (torch.sin(ang) * rope.mag).float()
