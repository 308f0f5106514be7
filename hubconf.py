"""torch.hub entry points (offline: weights come from a local file, nothing is downloaded).

    model = torch.hub.load("/path/to/svt", "svt_vitb_k400", source="local",
                           pretrained_path="checkpoints/kinetics400_vitb_ssl.pth")
"""
from __future__ import annotations

dependencies = ["torch", "timm", "einops"]

from models.timesformer import VisionTransformer, vit_base_patch16_224  # noqa: E402
from utils.checkpoint import load_pretrained_weights  # noqa: E402


def svt_vitb_k400(pretrained_path: str | None = None, checkpoint_key: str = "teacher",
                  **kwargs) -> VisionTransformer:
    """SVT TimeSformer-B/16 backbone (divided space-time, 8 frames, 224 px), returning the 768-d CLS
    feature. `pretrained_path`: a local SVT checkpoint, e.g. the released `kinetics400_vitb_ssl.pth`
    or a training `checkpoint.pth` (`checkpoint_key` picks teacher or student); None = random init.
    `kwargs` go to the model (num_frames, img_size, attention_type, ...)."""
    model = vit_base_patch16_224(**kwargs)
    if pretrained_path:
        load_pretrained_weights(model, pretrained_path, checkpoint_key=checkpoint_key)
    return model.eval()
