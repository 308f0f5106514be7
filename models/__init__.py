"""SVT models: the TimeSformer backbone, the DINO head and the multi-view wrapper."""
from models.dino import DINOHead, MultiCropWrapper
from models.timesformer import (ARCHS, VisionTransformer, build_backbone, vit_base_patch16_224,
                                vit_small_patch16_224, vit_tiny_patch16_224)

__all__ = [
    "ARCHS", "DINOHead", "MultiCropWrapper", "VisionTransformer", "build_backbone",
    "vit_base_patch16_224", "vit_small_patch16_224", "vit_tiny_patch16_224",
]
