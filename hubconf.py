"""torch.hub entry points (offline: weights come from a local file, nothing is downloaded).

    model = torch.hub.load("/path/to/svt", "svt_vitb_k400", source="local",
                           pretrained_path="checkpoints/kinetics400_vitb_ssl.pth")
"""
from __future__ import annotations

dependencies = ["torch", "timm", "einops"]

from models.timesformer import VisionTransformer, vit_base_patch16_224  # noqa: E402
from utils.checkpoint import image_model_advice, load_pretrained_weights  # noqa: E402


def svt_vitb_k400(pretrained_path: str | None = None, checkpoint_key: str = "teacher",
                  **kwargs) -> VisionTransformer:
    """SVT TimeSformer-B/16 backbone (divided space-time, 8 frames, 224 px), returning the 768-d CLS
    feature. `pretrained_path`: a local SVT checkpoint, e.g. the released `kinetics400_vitb_ssl.pth`
    or a training `checkpoint.pth` (`checkpoint_key` picks teacher or student); None = random init.
    `kwargs` go to the model (num_frames, img_size, attention_type, ...)."""
    model = vit_base_patch16_224(**kwargs)
    if pretrained_path:
        summary = load_pretrained_weights(model, pretrained_path, checkpoint_key=checkpoint_key)
        extra_blocks = [k for k in summary.unexpected if k.startswith("blocks.")]
        if summary.image_model:
            raise ValueError(image_model_advice(pretrained_path, "pretrained_path") + " Through torch.hub: build the "
                             "model without pretrained_path, then load_imagenet_init(model, path) of the repo's "
                             "utils/checkpoint.py.")
        if summary.missing or extra_blocks:  # another depth: part of the model would stay random
            raise ValueError(f"{pretrained_path}: {len(summary.missing)} weights of the model are not in the file "
                             f"{summary.missing[:3]}, {len(extra_blocks)} block weights of the file are not in the "
                             f"model {extra_blocks[:3]}; pass the model size as keyword arguments (embed_dim, depth, "
                             f"num_heads, patch_size). {summary.file_model}")
    return model.eval()
