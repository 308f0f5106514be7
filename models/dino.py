"""DINO projection head and the multi-view wrapper shared by student and teacher."""
from __future__ import annotations

import math

import torch
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
    """MLP (in -> hidden -> ... -> bottleneck, GELU), L2 normalisation, weight-normalised last layer.

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
        x = F.normalize(self.mlp(x), dim=-1, p=2)
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
