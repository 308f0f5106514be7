"""Per-video scores of a multi-view test, accumulated across ranks, and top-k hit counts.

A video is tested as several clips (TEST.NUM_ENSEMBLE_VIEWS x TEST.NUM_SPATIAL_CROPS); its score is the
sum of its clips' logits (the original's TestMeter, "sum") or the mean of their softmax probabilities
("softmax"). Both are sums over clips, so every rank adds the clips it ran and one all-reduce gives the
scores of the whole test set, whichever rank ran which clip. Clips of undecodable videos are not added;
a video without any added clip is "skipped".
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

ENSEMBLES = ("sum", "softmax")


class VideoScores:
    """Running per-video sums of clip scores (on `device`) and the number of clips added per video."""

    def __init__(self, num_videos: int, num_classes: int, ensemble: str = "sum",
                 device: torch.device | str = "cpu"):
        if ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
        self.ensemble = ensemble
        self.sums = torch.zeros(num_videos, num_classes, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_videos, dtype=torch.long, device=device)

    def add(self, clip_logits: torch.Tensor, video_ids: torch.Tensor) -> None:
        """Add (N, C) clip logits of the videos `video_ids` (N,)."""
        scores = clip_logits.softmax(dim=1) if self.ensemble == "softmax" else clip_logits
        video_ids = video_ids.to(self.sums.device, torch.long)
        self.sums.index_add_(0, video_ids, scores.to(self.sums.device, torch.float64))
        self.counts.index_add_(0, video_ids, torch.ones_like(video_ids))

    def all_reduce(self) -> None:
        """Sum the partial results of all ranks (a no-op without torch.distributed)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.sums)
            dist.all_reduce(self.counts)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """((num_videos, C) float32 CPU scores, (num_videos,) bool: the video has at least one clip)."""
        scores = self.sums
        if self.ensemble == "softmax":
            scores = scores / self.counts.clamp(min=1).unsqueeze(1)
        return scores.float().cpu(), (self.counts > 0).cpu()


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """(len(ks),) long tensor on the scores' device: for each k, how many rows have their label among
    their k highest scores (ties: lower class index first). No host sync."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    correct = order[:, :max(ks)].eq(labels.to(order.device, torch.long).view(-1, 1))
    return torch.stack([correct[:, :k].sum() for k in ks])
