"""Config defaults (fvcore CfgNode), the keys of the original's `--cfg` / `--opts` that do something here.

Run options (batch size, lr, epochs, ...) are argparse flags of each script; this config holds what
describes the data and the backbone, as in the original. Every key below is read somewhere.
"""
from fvcore.common.config import CfgNode

_C = CfgNode()

# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
_C.DATA = CfgNode()
# Folder with the list files: Kinetics {train,val,test}.csv, UCF/HMDB *_split_{SPLIT}_videos.txt, SSv2 json+csv.
_C.DATA.PATH_TO_DATA_DIR = ""
# The official split of UCF-101 / HMDB-51 whose lists are read ({ucf101,hmdb51}_{train,val}_split_{SPLIT}_videos.txt):
# 1, 2 or 3; the original reads split 1. Only these datasets have splits: 1 for the others.
_C.DATA.SPLIT = 1
# Prefix joined to every path of a list file (videos, or SSv2 frame folders).
_C.DATA.PATH_PREFIX = ""
# Separator between path and label in a list line; a comma or whitespace also works (the label is split off the
# right: a path may hold spaces).
_C.DATA.PATH_LABEL_SEPARATOR = " "
# Frames of an evaluation clip (and of every SSL view unless the frame lists below say otherwise).
_C.DATA.NUM_FRAMES = 8
# Stride between sampled frames at TARGET_FPS; a clip spans NUM_FRAMES * SAMPLING_RATE target frames.
_C.DATA.SAMPLING_RATE = 32
# Videos are resampled to this frame rate before sampling (fps-independent clip length).
_C.DATA.TARGET_FPS = 30
# Short-side jitter range of the clips the evaluation scripts train on (linear probe, fine-tuning); [0] is the
# short side of a one-crop val/test clip (SSv2's one-crop test clip: TEST_CROP_SIZE, as TimeSformer's).
_C.DATA.TRAIN_JITTER_SCALES = [256, 320]
# Short side of those training clips drawn as 1 / U(1 / MAX, 1 / MIN) instead of U(MIN, MAX): smaller sides are
# likelier (TimeSformer's SSv2 config sets it; utils/parser.py DATASET_OPTS does so for --dataset ssv2).
_C.DATA.INV_UNIFORM_SAMPLE = False
# Model input size: the global SSL views and the crop of the evaluation scripts' training clips.
_C.DATA.TRAIN_CROP_SIZE = 224
# Size of the local SSL views (the original hard-codes 96) and of the fast clip of --slowfast_eval.
_C.DATA.LOCAL_CROP_SIZE = 96
# Crop of the val/test clips; with TEST.NUM_SPATIAL_CROPS 3 (SSv2's test: always) also the short side they are
# resized to.
_C.DATA.TEST_CROP_SIZE = 224
# Evaluation normalisation. The original evaluates with 0.45/0.225 although pretraining uses the
# ImageNet statistics; we keep that to reproduce its numbers.
_C.DATA.MEAN = [0.45, 0.45, 0.45]
_C.DATA.STD = [0.225, 0.225, 0.225]
# Random horizontal flips (p 0.5) of training clips: each SSL view, and the clips the evaluation scripts train on.
_C.DATA.RANDOM_FLIP = True
# "auto" (torchcodec in exact seek mode when it works, else decord, else PyAV), "torchcodec", "decord" or
# "pyav". Every backend returns the frames its indices name; seek-unsafe files are decoded sequentially.
_C.DATA.DECODING_BACKEND = "auto"
# Where the SSL training views are decoded and augmented. cpu: in the DataLoader workers (DECODING_BACKEND).
# cuda: the workers only read the bytes and draw the views' parameters; the main process decodes with
# torchcodec's NVDEC decoder and augments on the GPU (datasets/device_views.py). Same views per seed.
_C.DATA.DECODE_DEVICE = "cpu"
# With DECODE_DEVICE cuda: videos of a batch the main process decodes at once, each in its own thread, NVDEC
# session and CUDA stream (NVDEC decodes one frame at a time per video: one video at a time idles its engines).
_C.DATA.DEVICE_DECODE_THREADS = 8
# Where the SSL views are cropped, resized, jittered and normalised when DECODE_DEVICE is cpu. cpu: in the workers.
# cuda: the workers decode the union of the views' frames (DECODING_BACKEND) and the main process augments on the
# GPU (datasets/device_views.py): less CPU per sample. Same views per seed.
_C.DATA.AUGMENT_DEVICE = "cpu"
# The original's variable frame rates: global views 4 and 8 frames, local views 2,2,4,4,8,8,16,16.
_C.DATA.RAND_FR = False
# Explicit frame counts per SSL view (override NUM_FRAMES / RAND_FR when non-empty). The paper's
# setting is GLOBAL_NUM_FRAMES [8, 16] and LOCAL_NUM_FRAMES [2, 2, 4, 4, 8, 8, 16, 16].
_C.DATA.GLOBAL_NUM_FRAMES = []
_C.DATA.LOCAL_NUM_FRAMES = []
# SSL views without spatial augmentation: every view is the full frame resized to its size.
_C.DATA.NO_SPATIAL = False
# The original's switch of its Kinetics train mode from the SSL views to one plain clip (its linear probe on Kinetics
# needed True). Nothing reads it here: train_ssl.py always cuts the SSL views (True is an error there) and the
# evaluation scripts always train on plain clips (True is accepted there, with a note, for the original's commands).
_C.DATA.NO_RGB_AUG = False
# Experimental branches of the original that are not ported; accepted only as False.
_C.DATA.USE_FLOW = False
_C.DATA.NO_FLOW_AUG = False
_C.DATA.RAND_CONV = False

# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
_C.MODEL = CfgNode()
# Stochastic depth of the backbone (the original hard-codes 0.1, teacher included).
_C.MODEL.DROP_PATH_RATE = 0.1
# Number of blocks; 0 keeps the architecture's 12. Fewer blocks make quick CPU runs (the demo) practical.
_C.MODEL.DEPTH = 0
# Experimental branches of the original that are not ported; accepted only as False.
_C.MODEL.TWO_STREAM = False
_C.MODEL.TWO_TOKEN = False
_C.MODEL.CNN_DISTILL = False

_C.TIMESFORMER = CfgNode()
# divided_space_time (SVT), space_only or joint_space_time.
_C.TIMESFORMER.ATTENTION_TYPE = "divided_space_time"
# Local file with ImageNet ViT-B/16 weights (DINO or timm layout) for the spatial init.
# The paper initialises from DINO ViT-B/16 (dino_vitbase16_pretrain.pth); empty = random init.
_C.TIMESFORMER.PRETRAINED_MODEL = ""

# ---------------------------------------------------------------------------------------------
# Multi-view test
# ---------------------------------------------------------------------------------------------
_C.TEST = CfgNode()
# Temporal clips per video in the multi-view test.
_C.TEST.NUM_ENSEMBLE_VIEWS = 1
# Spatial crops per clip in the multi-view test (1 = centre, 3 = left/centre/right).
_C.TEST.NUM_SPATIAL_CROPS = 3

# Keys of the original that select branches we do not port: only False is accepted.
UNSUPPORTED_TRUE_KEYS = (
    "DATA.USE_FLOW", "DATA.NO_FLOW_AUG", "DATA.RAND_CONV",
    "MODEL.TWO_STREAM", "MODEL.TWO_TOKEN", "MODEL.CNN_DISTILL",
)


def get_cfg() -> CfgNode:
    """A fresh copy of the defaults."""
    return _C.clone()
