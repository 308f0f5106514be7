"""SVT models: the TimeSformer backbone, the DINO head, the multi-view wrapper and the DINO loss."""
from models.dino import DINOHead, DINOLoss, MultiCropWrapper
from models.timesformer import (ARCHS, VisionTransformer, build_backbone, vit_base_patch16_224,
                                vit_small_patch16_224, vit_tiny_patch16_224)

__all__ = [
    "ARCHS", "DINOHead", "DINOLoss", "MultiCropWrapper", "VisionTransformer", "build_backbone",
    "vit_base_patch16_224", "vit_small_patch16_224", "vit_tiny_patch16_224",
]
