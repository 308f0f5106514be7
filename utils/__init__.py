"""Small, flat helpers: config (defaults, parser), checkpoints, and DINO-style training utilities."""
from utils.checkpoint import load_pretrained_weights

__all__ = ["load_pretrained_weights"]
