"""DINO projection head, the multi-view wrapper shared by student and teacher, and the DINO loss."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight = g * v / ||v|| (norm per output row), g of shape (out, 1).

    The same parameterisation and parameter names (`weight_g`, `weight_v`) as the legacy
    `torch.nn.utils.weight_norm(nn.Linear(...), dim=0)` that DINO and SVT use, so their heads load
    unchanged. Written out here because the legacy helper is deprecated and its modules cannot be
    deep-copied after a forward pass (it caches the computed weight as a non-leaf attribute).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's default init of the direction
        self.weight_g = nn.Parameter(v.norm(dim=1, keepdim=True))
        self.weight_v = nn.Parameter(v)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x @ (g * v / ||v||)^T computed as (x @ v^T) * (g / ||v||)^T: the same product, without
        # materialising the normalised (out, in) weight (65536 x 256 in SVT) in every forward and backward.
        scale = (self.weight_g / self.weight_v.norm(dim=1, keepdim=True)).t()
        return F.linear(x, self.weight_v) * scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DINOHead(nn.Module):
    """MLP (in -> hidden -> ... -> bottleneck, GELU), L2 normalisation, weight-normalised last layer; in fp32 also
    under autocast.

    With `norm_last_layer` the gain g is frozen at 1, so the last layer is a cosine-similarity layer.
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        nn.init.ones_(self.last_layer.weight_g)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 under mixed precision: bf16's 8-bit mantissa on the prototype similarities (~0.004 near 1), divided
        # by the teacher temperature 0.04, is ~0.1 logit of noise on the targets. The head is ~0.03 % of the FLOPs.
        with torch.autocast(x.device.type, enabled=False):
            x = F.normalize(self.mlp(x.float()), dim=-1, p=2)
            return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Runs the backbone on a list of views and the head once on all their CLS features.

    Consecutive views with the same (T, H, W) are concatenated along the batch and go through the
    backbone together; the outputs are concatenated in view order, so the result is (V*B, out_dim),
    view-major then batch. The original groups by width only and needs hard-coded boundaries
    (`vary_fr`) when frame counts differ within a width group; grouping on (T, H, W) covers both cases
    with the same passes for the original's view layouts.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        if hasattr(backbone, "head"):  # the backbone must return its CLS feature
            backbone.head = nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        views = x if isinstance(x, (list, tuple)) else [x]
        outputs, start = [], 0
        for end in range(1, len(views) + 1):
            if end == len(views) or views[end].shape[-3:] != views[start].shape[-3:]:
                outputs.append(self.backbone(torch.cat(views[start:end])))
                start = end
        return self.head(torch.cat(outputs))


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher softmax and the student log-softmax, averaged
    over every (teacher global view, student view) pair with different views: 2 * (ncrops - 1) terms.

    After each forward, `target_entropy` holds (mean entropy of a target, entropy of the batch-mean target) in
    nats: both near ln(out_dim) is uniform collapse, both near 0 is collapse onto one prototype; healthy
    training has sharp targets (low first) spread over many prototypes (high second)."""

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.target_entropy = torch.zeros(2)
        # The teacher temperature has a linear warm-up, indexed per epoch.
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(max(nepochs - warmup_teacher_temp_epochs, 0)) * teacher_temp,
        ))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        student_logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        temp = self.teacher_temp_schedule[epoch]
        teacher_p = F.softmax((teacher_output.float() - self.center) / temp, dim=-1).detach()
        # All (teacher view i, student view v) cross-entropies at once: ce[b, i, v] = -sum_k q[i,b,k] logp[v,b,k]
        # as one batched matmul over the K prototypes (instead of 2 * ncrops element-wise passes).
        batch = teacher_p.shape[0] // 2
        q = teacher_p.unflatten(0, (2, batch)).transpose(0, 1)  # (B, 2, K)
        logp = student_logp.unflatten(0, (self.ncrops, batch)).permute(1, 2, 0)  # (B, K, ncrops)
        with torch.autocast(q.device.type, enabled=False):  # the loss stays fp32 under mixed precision
            ce = -torch.bmm(q, logp).mean(dim=0)  # (2, ncrops), each the batch mean of one pair
        same_view = torch.eye(2, self.ncrops, dtype=torch.bool, device=ce.device)
        n_loss_terms = 2 * self.ncrops - min(2, self.ncrops)
        self.update_center(teacher_output, teacher_p)
        return ce.masked_fill(same_view, 0).sum() / n_loss_terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor, teacher_p: torch.Tensor) -> None:
        """EMA of the teacher's mean output over the global batch (all ranks), and the collapse diagnostics
        of the targets `teacher_p` (DINO paper, Fig. 7) in `target_entropy`: the mean entropy of a target and
        the entropy of the global batch's mean target. One all-reduce for both, no host sync."""
        per_sample = -(teacher_p * teacher_p.clamp_min(1e-12).log()).sum(dim=-1).mean()
        sums = torch.stack((teacher_output.float().sum(dim=0), teacher_p.sum(dim=0)))
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world_size > 1:
            dist.all_reduce(sums)
        batch_center, mean_p = sums / (len(teacher_output) * world_size)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
        self.target_entropy = torch.stack((per_sample, -(mean_p * mean_p.clamp_min(1e-12).log()).sum()))

