"""torch.hub entry points (offline: weights come from a local file, nothing is downloaded).

    model = torch.hub.load("/path/to/svt", "svt_vitb_k400", source="local",
                           pretrained_path="checkpoints/kinetics400_vitb_ssl.pth")

svt's top-level packages are named `models` and `utils`, as many projects' own are. In a process without modules of
those names of its own, the entry points import svt's as usual and leave them imported: the model pickles whole
(`torch.save(model)`) and every load returns the same class. A process with its own `models` or `utils` (imported
before the load) has them set aside while the entry point imports svt's and put back when it returns, svt's leaving
sys.modules again: neither hides the other, but svt's classes are then not importable by their names, so save such a
model with `torch.save(model.state_dict())`, not whole.
"""
from __future__ import annotations

import contextlib
import os
import sys
from types import ModuleType

dependencies = ["torch", "timm", "einops"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGES = ("models", "utils")  # svt's packages the entry points import


def _of_packages(name: str) -> bool:
    return name.partition(".")[0] in _PACKAGES


def _is_svt(module: ModuleType) -> bool:
    return os.path.abspath(getattr(module, "__file__", None) or os.sep).startswith(_HERE + os.sep)


@contextlib.contextmanager
def _svt_packages():
    """svt's `models` and `utils` importable in the block (this folder first on sys.path). Modules of those names that
    are not svt's (the caller's) are set aside for the block and put back at its end, and the svt modules it imported
    leave sys.modules with them; without such modules svt's stay imported (module docstring)."""
    before = {name for name in sys.modules if _of_packages(name)}
    theirs = {name: sys.modules.pop(name) for name in before if not _is_svt(sys.modules[name])}
    sys.path.insert(0, _HERE)
    try:
        yield
    finally:
        sys.path.remove(_HERE)
        if theirs:
            for name in [name for name in sys.modules if _of_packages(name) and name not in before]:
                del sys.modules[name]
            sys.modules.update(theirs)


def svt_vitb_k400(pretrained_path: str | None = None, checkpoint_key: str = "teacher", **kwargs):
    """SVT TimeSformer-B/16 backbone (divided space-time, 8 frames, 224 px; a models.timesformer.VisionTransformer),
    returning the 768-d CLS feature. `pretrained_path`: a local SVT checkpoint, e.g. the released
    `kinetics400_vitb_ssl.pth` or a training `checkpoint.pth` (`checkpoint_key` picks teacher or student); None =
    random init. `kwargs` go to the model (num_frames, img_size, attention_type, ...); the file's positional and
    time embeddings are kept at their stored size and resized to each input as the model runs."""
    with _svt_packages():
        from models.timesformer import vit_base_patch16_224
        from utils.checkpoint import image_model_advice, load_pretrained_weights

        model = vit_base_patch16_224(**kwargs)
        if pretrained_path:
            summary = load_pretrained_weights(model, pretrained_path, checkpoint_key=checkpoint_key,
                                              stored_embeddings=True)
            extra_blocks = [k for k in summary.unexpected if k.startswith("blocks.")]
            if summary.image_model:
                raise ValueError(image_model_advice(pretrained_path, "pretrained_path") + " Through torch.hub: build "
                                 "the model without pretrained_path, then load_imagenet_init(model, path) of the "
                                 "repo's utils/checkpoint.py.")
            if summary.missing or extra_blocks:  # another depth: part of the model would stay random
                raise ValueError(f"{pretrained_path}: {len(summary.missing)} weights of the model are not in the "
                                 f"file {summary.missing[:3]}, {len(extra_blocks)} block weights of the file are not "
                                 f"in the model {extra_blocks[:3]}; pass the model size as keyword arguments "
                                 f"(embed_dim, depth, num_heads, patch_size). {summary.file_model}")
    return model.eval()
