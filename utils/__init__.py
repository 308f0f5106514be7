"""Small, flat helpers: config (defaults, parser), checkpoint files, evaluation, DINO-style training utilities."""
