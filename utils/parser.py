"""Load the fvcore config from `--cfg` and `--opts`, as the original scripts pass them."""
import argparse
import difflib
import os
from typing import Sequence

from fvcore.common.config import CfgNode

from datasets.decoder import BACKENDS
from datasets.video_dataset import DECODE_DEVICES, SPLITS, check_split
from models.timesformer import ATTENTION_TYPES
from utils.defaults import UNSUPPORTED_TRUE_KEYS, get_cfg

DEFAULT_CFG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "models", "configs", "Kinetics", "TimeSformer_divST_8x32_224.yaml")


def add_config_args(parser) -> None:
    """Add the original's `--cfg` and `--opts` arguments to an argparse parser (`--opts` must be last)."""
    parser.add_argument("--cfg", dest="cfg_file", default=DEFAULT_CFG, type=str,
                        help="fvcore YAML with the data/model config (default: the SVT Kinetics config).")
    parser.add_argument("--opts", default=None, nargs=argparse.REMAINDER,
                        help="KEY VALUE pairs that override the YAML, e.g. `--opts DATA.PATH_PREFIX /data/k400/videos "
                             "DATA.NUM_FRAMES 16`; the keys are those of utils/defaults.py (another one is an error "
                             "naming it). Must be the last argument.")


class DroppedOption(argparse.Action):
    """An option of the original (or of DINO's same script) that svt does not take: an error saying what to pass
    instead, where argparse would only say 'unrecognized arguments'. Not in --help and not in the parsed args."""

    def __init__(self, option_strings, dest, instead: str, **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.instead = instead

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is an option of the original that svt does not take: {self.instead}")


def add_dropped_args(parser, dropped: dict[str, str]) -> None:
    """Options of the original script that svt dropped (they did nothing there), each with what to pass instead."""
    for flag, instead in dropped.items():
        parser.add_argument(flag, action=DroppedOption, instead=instead)


LISTS_FROM_OPTS = ("the lists come from --opts DATA.PATH_TO_DATA_DIR (the folder of the list files) and the videos "
                   "from DATA.PATH_PREFIX (the folder their paths are relative to), as in the original's scripts")


def _all_keys(node: CfgNode, prefix: str = "") -> list[str]:
    keys = []
    for name, value in node.items():
        keys += _all_keys(value, f"{prefix}{name}.") if isinstance(value, CfgNode) else [f"{prefix}{name}"]
    return keys


# Keys of the original's TimeSformer config that are command-line flags of the svt scripts instead.
_FLAG_INSTEAD = {
    "TRAIN.BATCH_SIZE": "--batch_size_per_gpu", "TEST.BATCH_SIZE": "--batch_size_per_gpu",
    "DATA_LOADER.NUM_WORKERS": "--num_workers", "SOLVER.BASE_LR": "--lr", "SOLVER.MAX_EPOCH": "--epochs",
    "SOLVER.WEIGHT_DECAY": "--weight_decay", "SOLVER.MOMENTUM": "--momentum (eval_finetune.py)",
    "SOLVER.NESTEROV": "--nesterov (eval_finetune.py)", "SOLVER.STEPS": "--lr_decay_epochs (eval_finetune.py)",
    "SOLVER.LRS": "--lr_decay (eval_finetune.py)",
    "MODEL.NUM_CLASSES": "--num_labels (eval_linear.py, eval_finetune.py)",
    "NUM_GPUS": "the launcher (torchrun --nproc_per_node)", "OUTPUT_DIR": "--output_dir",
    "RNG_SEED": "--seed",
    # what TimeSformer's README passes to fine-tune from a checkpoint and to test one
    "TRAIN.CHECKPOINT_FILE_PATH": "--pretrained_weights (train_ssl.py: --pretrained_rgb)",
    "TEST.CHECKPOINT_FILE_PATH": "--evaluate with the fine-tuning's --output_dir (eval_finetune.py; eval_linear.py: "
                                 "--lc_pretrained_weights)",
    "TRAIN.EVAL_PERIOD": "--val_freq (eval_linear.py, eval_finetune.py)",
    "TRAIN.CHECKPOINT_PERIOD": "--saveckp_freq (train_ssl.py; the evaluation scripts rewrite checkpoint every epoch)",
    "TRAIN.DATASET": "--dataset", "TEST.DATASET": "--dataset",
}


def _require_key(cfg: CfgNode, key: str) -> None:
    known = _all_keys(cfg)
    if key not in known:
        if key.upper() in _FLAG_INSTEAD:
            raise KeyError(f"--opts: config key {key!r} of the original is a command-line option here: use "
                           f"{_FLAG_INSTEAD[key.upper()]}.")
        by_upper = {k.upper(): k for k in known}
        close = [by_upper[k] for k in difflib.get_close_matches(key.upper(), list(by_upper), n=3)]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"--opts: unknown config key {key!r}.{hint} The keys svt reads are listed in "
                       f"utils/defaults.py.")


def _unknown_yaml_keys_message(cfg: CfgNode, cfg_file: str, err: KeyError) -> str:
    """Every key of `cfg_file` that svt does not read, with the flag that replaces it where there is one
    (an original TimeSformer YAML carries TRAIN.* / SOLVER.* / ... keys of TimeSformer's own recipe)."""
    known = set(_all_keys(cfg))
    try:
        unknown = [k for k in _all_keys(CfgNode(CfgNode.load_yaml_with_base(cfg_file))) if k not in known]
    except Exception:  # e.g. a _BASE_ that is missing: fvcore's own message says it
        unknown = []
    if not unknown:
        return f"{cfg_file}: {err.args[0]}. The keys svt reads are listed in utils/defaults.py."
    flags = [f"{k} -> {_FLAG_INSTEAD[k]}" for k in unknown if k in _FLAG_INSTEAD]
    return (f"{cfg_file}: keys svt does not read: {', '.join(unknown)}. Delete them (the keys svt reads are listed "
            f"in utils/defaults.py; an original TimeSformer YAML's TRAIN/SOLVER/... keys are TimeSformer's own "
            f"recipe)." + (f" Command-line options replace some: {'; '.join(flags)}." if flags else ""))


def _check(cfg: CfgNode) -> None:
    for key in UNSUPPORTED_TRUE_KEYS:
        node, name = key.split(".")
        if cfg[node][name]:
            raise ValueError(f"{key} True selects an experimental branch of the original code that is not "
                             f"supported in this reimplementation; leave it False.")
    for key, choices in _CHOICES.items():
        if _value(cfg, key) not in choices:
            raise ValueError(f"{key} {_value(cfg, key)!r} is not one of {', '.join(choices)}.")
    _check_ranges(cfg)


# Keys that take one of a few values, each list from the code that reads the key.
_CHOICES = {"TIMESFORMER.ATTENTION_TYPE": ATTENTION_TYPES, "DATA.DECODING_BACKEND": BACKENDS,
            "DATA.DECODE_DEVICE": DECODE_DEVICES, "DATA.AUGMENT_DEVICE": DECODE_DEVICES}


# Integer keys with their least value and what they are (for the error).
_AT_LEAST = {
    "DATA.NUM_FRAMES": (1, "frames per clip"), "DATA.SAMPLING_RATE": (1, "the stride between sampled frames"),
    "DATA.TRAIN_CROP_SIZE": (1, "a crop side in pixels"), "DATA.LOCAL_CROP_SIZE": (1, "a crop side in pixels"),
    "DATA.TEST_CROP_SIZE": (1, "a crop side in pixels"), "DATA.DEVICE_DECODE_THREADS": (1, "a thread count"),
    "TEST.NUM_ENSEMBLE_VIEWS": (1, "temporal clips per video"),
    "MODEL.DEPTH": (0, "a block count (0 keeps the architecture's 12)"),
}


def _check_ranges(cfg: CfgNode) -> None:
    """Values no run can use (a stride of 0 repeats one frame, a 2-entry mean fails later in a broadcast), each
    an error naming the key and what it takes."""
    data = cfg.DATA
    for key, (minimum, what) in _AT_LEAST.items():
        if _value(cfg, key) < minimum:
            raise ValueError(f"{key} {_value(cfg, key)}: {what}, must be >= {minimum}.")
    if data.TARGET_FPS <= 0:
        raise ValueError(f"DATA.TARGET_FPS {data.TARGET_FPS}: a frame rate must be > 0 (SVT's: 30).")
    for key in ("DATA.GLOBAL_NUM_FRAMES", "DATA.LOCAL_NUM_FRAMES"):
        if any(int(n) < 1 for n in _value(cfg, key)):
            raise ValueError(f"{key} {list(_value(cfg, key))}: every frame count must be >= 1.")
    scales = list(data.TRAIN_JITTER_SCALES)
    if len(scales) != 2 or not 1 <= scales[0] <= scales[1]:
        raise ValueError(f"DATA.TRAIN_JITTER_SCALES {scales}: give the short-side range [MIN, MAX] in pixels with "
                         "1 <= MIN <= MAX (SVT's: [256, 320]).")
    if not 0 <= cfg.MODEL.DROP_PATH_RATE < 1:
        raise ValueError(f"MODEL.DROP_PATH_RATE {cfg.MODEL.DROP_PATH_RATE}: a drop probability takes 0 <= rate < 1 "
                         "(SVT's: 0.1).")
    if data.SPLIT not in SPLITS:
        raise ValueError(f"DATA.SPLIT {data.SPLIT}: the official split of UCF-101 / HMDB-51 whose lists are read "
                         f"takes {', '.join(map(str, SPLITS))}.")
    if cfg.TEST.NUM_SPATIAL_CROPS not in (1, 3):
        raise ValueError(f"TEST.NUM_SPATIAL_CROPS {cfg.TEST.NUM_SPATIAL_CROPS}: 1 (centre crop) or 3 "
                         "(left/centre/right) are supported, as in the original.")
    for key, svt in (("DATA.MEAN", 0.45), ("DATA.STD", 0.225)):
        if len(_value(cfg, key)) != 3:
            raise ValueError(f"{key} {list(_value(cfg, key))}: give one value per RGB channel, 3 in all (SVT's: "
                             f"{[svt] * 3}).")
    if min(data.STD) <= 0:
        raise ValueError(f"DATA.STD {list(data.STD)}: each value divides the clip, so it must be > 0.")


def check_clip_sizes(cfg: CfgNode, patch_size: int, *, eval_clips: bool = True, train_clips: bool = False,
                     slowfast: bool = False, ssl_views: bool = False) -> None:
    """Crop sizes a run can cut and its backbone (patches of `patch_size`, the script's --patch_size) can take,
    before any data is read. eval_clips: val/test clips (short side TRAIN_JITTER_SCALES[0], or TEST_CROP_SIZE with
    3 spatial crops, then a TEST_CROP_SIZE crop); train_clips: the clips the evaluation scripts train on (short side
    in TRAIN_JITTER_SCALES, then a TRAIN_CROP_SIZE crop); slowfast: the LOCAL_CROP_SIZE fast clip; ssl_views: the
    SSL views (TRAIN_CROP_SIZE globals, LOCAL_CROP_SIZE locals)."""
    data, scale = cfg.DATA, cfg.DATA.TRAIN_JITTER_SCALES[0]
    crops = {"DATA.TEST_CROP_SIZE": eval_clips, "DATA.TRAIN_CROP_SIZE": train_clips or ssl_views,
             "DATA.LOCAL_CROP_SIZE": slowfast or (ssl_views and not data.NO_SPATIAL)}  # NO_SPATIAL: all global
    for key, used in crops.items():
        if used and _value(cfg, key) % patch_size:
            size = _value(cfg, key)
            raise ValueError(f"{key} {size} is not a multiple of the patch size {patch_size} (--patch_size): pass "
                             f"{key} {max(patch_size, size // patch_size * patch_size)} or another multiple.")
    for key, used in (("DATA.TEST_CROP_SIZE", eval_clips), ("DATA.TRAIN_CROP_SIZE", train_clips)):
        if used and _value(cfg, key) > scale:
            raise ValueError(f"{key} {_value(cfg, key)} is larger than the short side DATA.TRAIN_JITTER_SCALES[0] "
                             f"{scale} the clips are resized to before that crop: raise DATA.TRAIN_JITTER_SCALES to "
                             f"[{_value(cfg, key)}, {max(data.TRAIN_JITTER_SCALES[1], _value(cfg, key))}] or more, "
                             f"or lower {key} (SVT's: TRAIN_JITTER_SCALES [256, 320], crops 224).")


def load_config_from(cfg_file: str | None = None, opts: Sequence[str] | None = None) -> CfgNode:
    """Defaults, then the YAML, then the KEY VALUE overrides; unknown keys are errors that name the key."""
    cfg = get_cfg()
    if cfg_file:
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"--cfg {cfg_file}: no such file.")
        try:
            cfg.merge_from_file(cfg_file)
        except KeyError as err:
            raise KeyError(_unknown_yaml_keys_message(cfg, cfg_file, err)) from None
    if opts:
        if "--opts" in opts:  # argparse's REMAINDER hands a second --opts (and what follows) to the first
            raise ValueError(f"--opts given twice: put all KEY VALUE pairs after one --opts (got {list(opts)})")
        if len(opts) % 2:
            raise ValueError(f"--opts takes KEY VALUE pairs, got an odd number of items: {list(opts)}")
        for key in opts[0::2]:
            _require_key(cfg, key)
        cfg.merge_from_list(list(opts))
    _check(cfg)
    cfg.freeze()
    return cfg


def note_unused_keys(cfg: CfgNode, keys: Sequence[str], why: str) -> str | None:
    """For a job that does not read `keys`: a note naming those of them that the YAML or --opts moved from their
    default (shared option lists are fine, a silently ignored setting is not), printed and returned."""
    defaults = get_cfg()
    changed = [k for k in keys if _value(cfg, k) != _value(defaults, k)]
    if not changed:
        return None
    note = f"Note: {', '.join(changed)} {'is' if len(changed) == 1 else 'are'} set, but {why}"
    print(note)
    return note


def _value(cfg: CfgNode, key: str):
    node, name = key.split(".")
    return cfg[node][name]


# Where a dataset's evaluation protocol differs from the defaults, applied by load_config to every script with a
# --dataset (after the YAML, before --opts, which win). TimeSformer's SSv2 config: no horizontal flips (SSv2's labels
# tell left from right, "Pushing something from left to right") and inverse-uniform short-side jitter.
DATASET_OPTS = {"ssv2": ["DATA.RANDOM_FLIP", "False", "DATA.INV_UNIFORM_SAMPLE", "True"]}


def load_config(args) -> CfgNode:
    """The config for a parsed argparse namespace with `cfg_file` and `opts`: the defaults, the YAML, the
    DATASET_OPTS of its `dataset` (if it has one), then `opts`; DATA.SPLIT checked to apply to that dataset."""
    dataset = getattr(args, "dataset", None)
    opts = DATASET_OPTS.get(dataset, []) + list(getattr(args, "opts", None) or [])
    cfg = load_config_from(getattr(args, "cfg_file", None), opts)
    if dataset is not None:
        check_split(dataset, cfg.DATA.SPLIT)
    return cfg
