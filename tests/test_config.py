"""The fvcore config: defaults, YAML, --opts overrides and their errors."""
import argparse
from pathlib import Path

import pytest
from fvcore.common.config import CfgNode

from utils.defaults import get_cfg
from utils.parser import DEFAULT_CFG, add_config_args, check_clip_sizes, load_config, load_config_from

ORIGINAL_TRAIN_OPTS = ["MODEL.TWO_STREAM", "False", "MODEL.TWO_TOKEN", "False", "DATA.NO_FLOW_AUG", "False",
                       "DATA.USE_FLOW", "False", "DATA.RAND_CONV", "False", "DATA.NO_SPATIAL", "False"]


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    add_config_args(parser)
    return parser.parse_args(argv)


def test_default_yaml_values():
    cfg = load_config_from(DEFAULT_CFG)
    assert cfg.DATA.NUM_FRAMES == 8 and cfg.DATA.SAMPLING_RATE == 32 and cfg.DATA.TARGET_FPS == 30
    assert cfg.DATA.TRAIN_CROP_SIZE == 224 and cfg.DATA.LOCAL_CROP_SIZE == 96
    assert cfg.DATA.MEAN == [0.45] * 3 and cfg.DATA.STD == [0.225] * 3
    assert cfg.TIMESFORMER.ATTENTION_TYPE == "divided_space_time"
    assert cfg.TEST.NUM_SPATIAL_CROPS == 3 and cfg.TEST.NUM_ENSEMBLE_VIEWS == 1
    assert cfg.TIMESFORMER.PRETRAINED_MODEL == ""


def test_the_default_yaml_holds_the_values_of_defaults_py():
    """The --cfg default sets the original's YAML keys to utils/defaults.py's values: a default changed in one of the
    two files alone would be overridden by the YAML (every script loads it) or differ between them."""
    def flat(node, prefix=""):
        for name, value in node.items():
            yield from flat(value, f"{prefix}{name}.") if isinstance(value, dict) else [(f"{prefix}{name}", value)]

    defaults = dict(flat(get_cfg()))
    yaml = dict(flat(CfgNode.load_yaml_with_base(DEFAULT_CFG)))
    assert yaml and yaml.keys() <= defaults.keys()
    differ = [f"{key}: {DEFAULT_CFG} has {value!r}, utils/defaults.py {defaults[key]!r}" for key, value in yaml.items()
              if value != defaults[key]]
    assert not differ, "; ".join(differ)


def test_original_train_sh_opts_are_accepted():
    args = _parse(["--epochs", "3", "--opts", *ORIGINAL_TRAIN_OPTS])
    cfg = load_config(args)
    assert args.epochs == 3 and cfg.MODEL.TWO_STREAM is False and cfg.DATA.NO_SPATIAL is False


def test_opts_round_trip_and_types():
    args = _parse(["--opts", "DATA.PATH_PREFIX", "/data/ucf101/videos", "DATA.NUM_FRAMES", "16",
                   "DATA.LOCAL_NUM_FRAMES", "[2,2,4,4,8,8,16,16]", "DATA.RAND_FR", "True"])
    cfg = load_config(args)
    assert cfg.DATA.PATH_PREFIX == "/data/ucf101/videos"
    assert cfg.DATA.NUM_FRAMES == 16
    assert cfg.DATA.LOCAL_NUM_FRAMES == [2, 2, 4, 4, 8, 8, 16, 16]
    assert cfg.DATA.RAND_FR is True
    again = load_config_from(DEFAULT_CFG, ["DATA.LOCAL_NUM_FRAMES", str(cfg.DATA.LOCAL_NUM_FRAMES)])
    assert again.DATA.LOCAL_NUM_FRAMES == cfg.DATA.LOCAL_NUM_FRAMES


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(KeyError, match=r"DATA\.NUM_FRAME'.*DATA\.NUM_FRAMES"):
        load_config_from(DEFAULT_CFG, ["DATA.NUM_FRAME", "16"])


def test_type_mismatch_is_an_error():
    with pytest.raises(ValueError, match="DATA.NUM_FRAMES"):
        load_config_from(DEFAULT_CFG, ["DATA.NUM_FRAMES", "sixteen"])


def test_odd_opts_is_an_error():
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        load_config_from(DEFAULT_CFG, ["DATA.NUM_FRAMES"])


def test_opts_given_twice_is_an_error():
    # argparse's REMAINDER puts the second --opts among the first one's items, pair count even or odd
    for argv in (["--opts", "DATA.NUM_FRAMES", "4", "--opts", "MODEL.DEPTH", "2"],
                 ["--opts", "DATA.NUM_FRAMES", "--opts", "MODEL.DEPTH", "2"]):
        args = _parse(argv)
        assert "--opts" in args.opts
        with pytest.raises(ValueError, match="--opts given twice: put all KEY VALUE pairs after one --opts"):
            load_config(args)


def test_yaml_with_unknown_key_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("SOLVER:\n  BASE_LR: 0.1\n")
    with pytest.raises(KeyError, match="bad.yaml"):
        load_config_from(str(bad))


def test_missing_yaml_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config_from(str(tmp_path / "nope.yaml"))


def test_model_depth_key_sets_the_number_of_blocks():
    from models import build_backbone
    cfg = load_config_from(DEFAULT_CFG, ["MODEL.DEPTH", "2", "DATA.TRAIN_CROP_SIZE", "32"])
    assert len(build_backbone("vit_tiny", cfg).blocks) == 2
    assert len(build_backbone("vit_tiny", load_config_from(DEFAULT_CFG, ["DATA.TRAIN_CROP_SIZE", "32"])).blocks) == 12


def test_opts_typo_in_case_suggests_the_real_key():
    with pytest.raises(KeyError, match=r"'data\.num_frames'.*Did you mean DATA\.NUM_FRAMES"):
        load_config_from(DEFAULT_CFG, ["data.num_frames", "16"])


def test_opts_key_that_became_a_flag_names_the_flag():
    with pytest.raises(KeyError, match=r"TRAIN\.BATCH_SIZE.*--batch_size_per_gpu"):
        load_config_from(DEFAULT_CFG, ["TRAIN.BATCH_SIZE", "8"])


@pytest.mark.parametrize("key, flag", [("TRAIN.CHECKPOINT_FILE_PATH", "--pretrained_weights"),
                                       ("TEST.CHECKPOINT_FILE_PATH", "--evaluate"), ("TRAIN.EVAL_PERIOD", "--val_freq"),
                                       ("TRAIN.CHECKPOINT_PERIOD", "--saveckp_freq"), ("TEST.DATASET", "--dataset")])
def test_timesformer_readme_keys_name_the_flag(key, flag):
    """The keys TimeSformer's README passes to fine-tune from a checkpoint and to test one name the flag here."""
    with pytest.raises(KeyError, match=rf"{key}' of the original is a command-line option here: use {flag}"):
        load_config_from(DEFAULT_CFG, [key, "x"])


# The original's launch lines (its scripts/train.sh, eval_linear.sh, eval_knn.sh; spec section 8), data paths
# aside: parsed here they must give the original's run (its argparse defaults plus what the scripts pass).
ORIGINAL_TRAIN_ARGV = ["--arch", "timesformer", "--batch_size_per_gpu", "8", "--data_path", "/data/k400",
                       "--output_dir", "checkpoints/svt_test", "--opts", *ORIGINAL_TRAIN_OPTS]
ORIGINAL_LINEAR_ARGV = ["--n_last_blocks", "1", "--arch", "vit_base", "--pretrained_weights", "ckpt.pth",
                        "--epochs", "20", "--lr", "0.001", "--batch_size_per_gpu", "16", "--num_workers", "4",
                        "--num_labels", "101", "--dataset", "ucf101", "--output_dir", "checkpoints/eval/le_001",
                        "--opts", "DATA.PATH_TO_DATA_DIR", "/data/ucf101/splits", "DATA.PATH_PREFIX",
                        "/data/ucf101/videos", "DATA.USE_FLOW", "False"]
ORIGINAL_KNN_ARGV = ["--arch", "vit_base", "--pretrained_weights", "ckpt.pth", "--batch_size_per_gpu", "128",
                     "--nb_knn", "5", "--temperature", "0.07", "--num_workers", "4", "--dataset", "ucf101",
                     "--opts", "DATA.PATH_TO_DATA_DIR", "/data/ucf101/knn_splits", "DATA.PATH_PREFIX",
                     "/data/ucf101/videos"]


def test_original_train_command_gives_the_original_recipe():
    import train_ssl
    from datasets.transform import ssl_view_frames
    args = train_ssl.get_args_parser().parse_args(ORIGINAL_TRAIN_ARGV)
    # DINO's main_dino.py defaults, unchanged by SVT, + train.sh's batch of 8 per GPU
    assert (args.epochs, args.warmup_epochs, args.lr, args.min_lr) == (100, 10, 5e-4, 1e-6)
    assert (args.weight_decay, args.weight_decay_end, args.clip_grad, args.optimizer) == (0.04, 0.4, 3.0, "adamw")
    assert (args.momentum_teacher, args.teacher_temp, args.warmup_teacher_temp, args.warmup_teacher_temp_epochs) \
        == (0.996, 0.04, 0.04, 0)
    assert (args.out_dim, args.norm_last_layer, args.use_bn_in_head, args.freeze_last_layer) == (65536, True, False, 1)
    assert (args.batch_size_per_gpu, args.use_fp16, args.seed, args.saveckp_freq, args.num_workers) \
        == (8, True, 0, 20, 10)
    assert (tuple(args.global_crops_scale), tuple(args.local_crops_scale), args.local_crops_number) \
        == ((0.4, 1.0), (0.05, 0.4), 8)
    assert (args.patch_size, args.center_momentum, args.teacher_drop_path) == (16, 0.9, True)
    cfg = load_config(args)
    # views: 8 frames x stride 32 at 30 fps, 2 x 224 + 8 x 96, all 8 frames (RAND_FR off); random init;
    # drop path 0.1 in student and teacher
    assert (cfg.DATA.NUM_FRAMES, cfg.DATA.SAMPLING_RATE, cfg.DATA.TARGET_FPS) == (8, 32, 30)
    assert (cfg.DATA.TRAIN_CROP_SIZE, cfg.DATA.LOCAL_CROP_SIZE) == (224, 96)
    assert ssl_view_frames(cfg, args.local_crops_number) == ((8, 8), (8,) * 8)
    assert cfg.TIMESFORMER.PRETRAINED_MODEL == "" and cfg.MODEL.DROP_PATH_RATE == 0.1
    assert cfg.TIMESFORMER.ATTENTION_TYPE == "divided_space_time"


def test_original_rand_fr_gives_its_frame_counts():
    from datasets.transform import ssl_view_frames
    cfg = load_config_from(DEFAULT_CFG, ["DATA.RAND_FR", "True"])
    assert ssl_view_frames(cfg, 8) == ((4, 8), (2, 2, 4, 4, 8, 8, 16, 16))


def test_original_linear_command_gives_the_original_protocol():
    import eval_linear
    args = eval_linear.get_args_parser().parse_args(ORIGINAL_LINEAR_ARGV)
    assert (args.n_last_blocks, args.avgpool_patchtokens, args.epochs, args.lr) == (1, False, 20, 0.001)
    assert (args.batch_size_per_gpu, args.num_labels, args.val_freq, args.checkpoint_key) == (16, 101, 1, "teacher")
    assert (args.ensemble, args.slowfast_eval, args.feature_bn) == ("sum", False, False)
    cfg = load_config(args)
    assert cfg.DATA.PATH_TO_DATA_DIR == "/data/ucf101/splits" and cfg.DATA.PATH_PREFIX == "/data/ucf101/videos"
    # evaluation normalisation 0.45/0.225, train jitter 256-320 + 224 crop, test 1 clip x 3 crops at 224
    assert cfg.DATA.MEAN == [0.45] * 3 and cfg.DATA.STD == [0.225] * 3 and cfg.DATA.RANDOM_FLIP
    assert (cfg.DATA.TRAIN_JITTER_SCALES, cfg.DATA.TRAIN_CROP_SIZE, cfg.DATA.TEST_CROP_SIZE) == ([256, 320], 224, 224)
    assert (cfg.TEST.NUM_ENSEMBLE_VIEWS, cfg.TEST.NUM_SPATIAL_CROPS) == (1, 3)


def test_original_knn_command_gives_the_original_protocol():
    import eval_knn
    args = eval_knn.get_args_parser().parse_args(ORIGINAL_KNN_ARGV)
    assert (args.nb_knn, args.temperature, args.batch_size_per_gpu, args.use_cuda) == ([5], 0.07, 128, True)
    assert eval_knn.get_args_parser().parse_args([]).nb_knn == [10, 20, 100, 200]  # DINO's parser default
    assert load_config(args).DATA.PATH_TO_DATA_DIR == "/data/ucf101/knn_splits"


@pytest.mark.parametrize("key", ["DATA.USE_FLOW", "DATA.NO_FLOW_AUG", "DATA.RAND_CONV", "MODEL.TWO_STREAM",
                                 "MODEL.TWO_TOKEN", "MODEL.CNN_DISTILL"])
def test_every_unported_key_set_true_is_an_error_naming_it(key, tmp_path):
    escaped = key.replace(".", r"\.")
    with pytest.raises(ValueError, match=rf"^{escaped} True .*not supported.*leave it False"):
        load_config_from(DEFAULT_CFG, [key, "True"])
    node, name = key.split(".")
    yaml = tmp_path / "exp.yaml"
    yaml.write_text(f"{node}:\n  {name}: True\n")
    with pytest.raises(ValueError, match=rf"^{escaped} True"):
        load_config_from(str(yaml))
    assert load_config_from(DEFAULT_CFG, [key, "False"])[node][name] is False


def test_dist_url_is_the_rendezvous_under_slurm_too(monkeypatch):
    """--dist_url is used wherever several processes meet (torchrun env and SLURM), as DINO does; a SLURM
    launcher can pass a shared file:// URL instead of MASTER_ADDR/MASTER_PORT."""
    from utils import utils
    calls = []
    monkeypatch.setattr(utils.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(utils.dist, "init_process_group", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(utils.dist, "barrier", lambda: None)
    monkeypatch.setattr(utils, "setup_for_distributed", lambda is_master: None)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_NODELIST", "node7")
    args = argparse.Namespace(dist_url="file:///shared/svt_init", dist_timeout=30)
    utils.init_distributed_mode(args)
    assert calls[-1]["init_method"] == "file:///shared/svt_init"
    assert (calls[-1]["rank"], calls[-1]["world_size"]) == (1, 2)
    args.dist_url = "env://"
    utils.init_distributed_mode(args)
    assert calls[-1]["init_method"] == "env://"


def test_original_timesformer_yaml_lists_every_key_svt_does_not_read(tmp_path):
    """The original's default YAML (TimeSformer's, spec section 2.4) carries TimeSformer's own TRAIN/SOLVER/...
    keys: --cfg with it names all of them at once and the flags that replace some, instead of the first only."""
    yaml = tmp_path / "TimeSformer_divST_8x32_224.yaml"
    yaml.write_text("TRAIN:\n  ENABLE: True\n  BATCH_SIZE: 8\nDATA:\n  NUM_FRAMES: 8\n  SAMPLING_RATE: 32\n"
                    "SOLVER:\n  BASE_LR: 0.005\n  MAX_EPOCH: 15\nMODEL:\n  NUM_CLASSES: 400\nNUM_GPUS: 8\n")
    with pytest.raises(KeyError) as err:
        load_config_from(str(yaml))
    message = err.value.args[0]
    assert message.startswith(f"{yaml}: keys svt does not read: TRAIN.ENABLE, TRAIN.BATCH_SIZE, SOLVER.BASE_LR, "
                              "SOLVER.MAX_EPOCH, MODEL.NUM_CLASSES, NUM_GPUS.")
    for replaced in ("TRAIN.BATCH_SIZE -> --batch_size_per_gpu", "SOLVER.BASE_LR -> --lr",
                     "SOLVER.MAX_EPOCH -> --epochs", "MODEL.NUM_CLASSES -> --num_labels"):
        assert replaced in message
    assert "TRAIN.ENABLE ->" not in message


# ---------------------------------------------------------------------------------------------
# Every option and key does something: read by the code, or an error
# ---------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = ("train_ssl", "eval_linear", "eval_knn", "eval_finetune", "visualize_attention", "run_with_submitit")


def _source_reads() -> tuple[set[str], set[str]]:
    """Over the repository's Python code (tests left out): the attribute names read off any object (cfg.DATA.X, or
    `data.X` for data = cfg.DATA) and those read off a namespace called args / opt (or by getattr with a constant)."""
    import ast
    attrs, arg_reads = set(), set()
    sources = [*ROOT.glob("*.py"), *(p for d in ("utils", "datasets", "models", "benchmarks", "scripts")
                                     for p in (ROOT / d).rglob("*.py"))]
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                attrs.add(node.attr)
                if isinstance(node.value, ast.Name) and node.value.id in ("args", "opt"):
                    arg_reads.add(node.attr)
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) > 1
                  and isinstance(node.args[1], ast.Constant)):
                arg_reads.add(node.args[1].value)
    return attrs, arg_reads


def test_every_config_key_is_read_or_rejected():
    """A key of utils/defaults.py that no code reads would be accepted and ignored: each is read as an attribute
    somewhere, or is one of the original's unported branches that are an error when True."""
    from utils.defaults import UNSUPPORTED_TRUE_KEYS, get_cfg
    from utils.parser import _all_keys
    attrs, _ = _source_reads()
    unread = [k for k in _all_keys(get_cfg()) if k.split(".")[1] not in attrs and k not in UNSUPPORTED_TRUE_KEYS]
    assert unread == []


def test_every_option_of_the_entry_scripts_is_read():
    """No dead options: each argparse dest of the entry scripts is read as args.<dest> (or getattr) somewhere.
    --local_rank alone is accepted and ignored, on purpose (torch.distributed.launch passes it; its help says).
    The original's dropped options (DroppedOption) are not options but errors saying what to pass instead."""
    from utils.parser import DroppedOption
    _, arg_reads = _source_reads()
    for name in ENTRY_SCRIPTS:
        parser = __import__(name).get_args_parser()
        dests = {a.dest for a in parser._actions if a.dest != "help" and not isinstance(a, DroppedOption)}
        assert dests - arg_reads - {"local_rank"} == set(), name


@pytest.mark.parametrize("script, run", [("train_ssl", "train_svt"), ("eval_linear", "eval_linear"),
                                         ("eval_knn", "main"), ("eval_finetune", "eval_finetune")])
def test_every_entry_script_rejects_an_unknown_opts_key_by_name(script, run, tmp_path):
    """Each job, run as its command line runs it, refuses a misspelt key before any work, naming it and the real
    one (run_with_submitit: tests/test_submitit.py)."""
    with pytest.raises(KeyError, match=r"unknown config key 'DATA\.SAMPLING_RAT'\. Did you mean DATA\.SAMPLING_RATE"
                       r"[,?]"):  # the closest key first
        _run_entry(script, run, ["--output_dir", str(tmp_path), "--opts", "DATA.SAMPLING_RAT", "4"])


@pytest.mark.parametrize("script, run", [("eval_linear", "eval_linear"), ("eval_knn", "main"),
                                         ("eval_finetune", "eval_finetune")])
@pytest.mark.parametrize("dataset", ["kinetics400", "ssv2"])
def test_data_split_of_a_dataset_without_splits_is_an_error_before_any_work(script, run, dataset, tmp_path):
    with pytest.raises(ValueError, match=rf"^DATA.SPLIT 2 applies only to ucf101/hmdb51 \(their official splits 1, "
                                         rf"2, 3\); {dataset} has one list per mode: leave DATA.SPLIT 1\.$"):
        _run_entry(script, run, ["--dataset", dataset, "--output_dir", str(tmp_path), "--opts", "DATA.SPLIT", "2"])
    assert not list(tmp_path.iterdir())


def test_data_split_loads_for_the_datasets_with_splits():
    for dataset in ("ucf101", "hmdb51"):
        args = argparse.Namespace(dataset=dataset, cfg_file=None, opts=["DATA.SPLIT", "3"])
        assert load_config(args).DATA.SPLIT == 3
    assert load_config(argparse.Namespace(dataset="kinetics400", cfg_file=None, opts=[])).DATA.SPLIT == 1


def _run_entry(script: str, run: str, argv: list[str]) -> None:
    """Run an entry script's job in-process as its command line runs it, then undo its process-wide changes."""
    import builtins

    import torch.distributed as dist
    module = __import__(script)
    args = module.get_args_parser().parse_args(argv)
    print_ = builtins.print
    try:
        getattr(module, run)(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        builtins.print = print_  # init_distributed_mode silences non-main ranks by replacing print


TINY_SIZES = ["DATA.TRAIN_CROP_SIZE", "32", "DATA.LOCAL_CROP_SIZE", "16", "DATA.TEST_CROP_SIZE", "32",
              "DATA.TRAIN_JITTER_SCALES", "[32,32]", "TEST.NUM_SPATIAL_CROPS", "1"]


@pytest.mark.parametrize("key, value, says", [
    ("DATA.SAMPLING_RATE", "0", "must be >= 1"), ("DATA.SAMPLING_RATE", "-4", "must be >= 1"),
    ("DATA.NUM_FRAMES", "0", "must be >= 1"), ("DATA.TEST_CROP_SIZE", "0", "must be >= 1"),
    ("TEST.NUM_ENSEMBLE_VIEWS", "0", "must be >= 1"), ("MODEL.DEPTH", "-1", "must be >= 0"),
    ("DATA.TARGET_FPS", "0", "must be > 0"), ("DATA.LOCAL_NUM_FRAMES", "[2, 0]", "every frame count"),
    ("MODEL.DROP_PATH_RATE", "1.5", "0 <= rate < 1"), ("MODEL.DROP_PATH_RATE", "-1.0", "0 <= rate < 1"),
    ("MODEL.DROP_PATH_RATE", "1.0", "0 <= rate < 1"), ("TEST.NUM_SPATIAL_CROPS", "2", "1 .centre crop. or 3"),
    ("DATA.MEAN", "[0.45, 0.45]", "3 in all"), ("DATA.STD", "[0.2, 0.2, 0.2, 0.2]", "3 in all"),
    ("DATA.STD", "[0.2, 0.0, 0.2]", "must be > 0"),
    ("DATA.TRAIN_JITTER_SCALES", "[320, 256]", "1 <= MIN <= MAX"), ("DATA.TRAIN_JITTER_SCALES", "[256]", "MIN"),
    ("DATA.SPLIT", "0", "takes 1, 2, 3"), ("DATA.SPLIT", "4", "takes 1, 2, 3"),
])
def test_a_value_no_run_can_use_is_an_error_naming_the_key(key, value, says):
    with pytest.raises(ValueError, match=rf"^{key.replace('.', '[.]')} .*{says}"):
        load_config_from(DEFAULT_CFG, [key, value])


@pytest.mark.parametrize("key, value, says", [
    ("TIMESFORMER.ATTENTION_TYPE", "divided", "divided_space_time, space_only, joint_space_time"),
    ("DATA.DECODING_BACKEND", "nvdec", "auto, torchcodec, decord, pyav"),
    ("DATA.DECODE_DEVICE", "gpu", "cpu, cuda"), ("DATA.AUGMENT_DEVICE", "GPU", "cpu, cuda"),
])
def test_a_value_outside_a_keys_choices_is_an_error_when_the_config_loads(key, value, says):
    """Every key of a few values is checked with the config, before any work: an evaluation given a DECODE_DEVICE
    typo (a key only pretraining reads) stops at once too."""
    with pytest.raises(ValueError, match=rf"^{key.replace('.', '[.]')} '{value}' is not one of {says}\.$"):
        load_config_from(DEFAULT_CFG, [key, value])


def test_edge_values_that_runs_use_still_load():
    cfg = load_config_from(DEFAULT_CFG, TINY_SIZES + ["DATA.SAMPLING_RATE", "1", "MODEL.DROP_PATH_RATE", "0.0",
                                                      "DATA.MEAN", "[0.0, 0.0, 0.0]", "DATA.STD", "[1.0, 1.0, 1.0]"])
    assert (cfg.DATA.SAMPLING_RATE, cfg.MODEL.DROP_PATH_RATE, cfg.TEST.NUM_SPATIAL_CROPS) == (1, 0.0, 1)
    check_clip_sizes(cfg, 16, train_clips=True, slowfast=True, ssl_views=True)
    check_clip_sizes(load_config_from(DEFAULT_CFG), 16, train_clips=True, slowfast=True, ssl_views=True)


def test_a_crop_larger_than_the_resized_short_side_names_both_keys():
    cfg = load_config_from(DEFAULT_CFG, TINY_SIZES + ["DATA.TEST_CROP_SIZE", "64"])
    with pytest.raises(ValueError, match=r"DATA\.TEST_CROP_SIZE 64 is larger than the short side "
                                         r"DATA\.TRAIN_JITTER_SCALES\[0\] 32 .* \[64, 64\] or more"):
        check_clip_sizes(cfg, 16)
    cfg = load_config_from(DEFAULT_CFG, TINY_SIZES + ["DATA.TRAIN_CROP_SIZE", "48"])
    check_clip_sizes(cfg, 16)  # only the clips the evaluation scripts train on are cut at TRAIN_CROP_SIZE
    check_clip_sizes(cfg, 16, ssl_views=True)  # the SSL views are resized crops of any size
    with pytest.raises(ValueError, match=r"DATA\.TRAIN_CROP_SIZE 48 is larger .* \[48, 48\]"):
        check_clip_sizes(cfg, 16, train_clips=True)


def test_local_crop_size_is_checked_only_where_a_clip_is_cut_at_it():
    """DATA.LOCAL_CROP_SIZE sizes the SSL local views and the slow-fast clip; with DATA.NO_SPATIAL every SSL view
    is global-sized, so an odd local size is no error there."""
    odd = TINY_SIZES + ["DATA.LOCAL_CROP_SIZE", "20"]
    with pytest.raises(ValueError, match=r"DATA\.LOCAL_CROP_SIZE 20 is not a multiple of the patch size 16"):
        check_clip_sizes(load_config_from(DEFAULT_CFG, odd), 16, ssl_views=True)
    with pytest.raises(ValueError, match=r"DATA\.LOCAL_CROP_SIZE 20 is not a multiple"):
        check_clip_sizes(load_config_from(DEFAULT_CFG, odd), 16, slowfast=True)
    check_clip_sizes(load_config_from(DEFAULT_CFG, odd + ["DATA.NO_SPATIAL", "True"]), 16, ssl_views=True)
    check_clip_sizes(load_config_from(DEFAULT_CFG, odd), 16, train_clips=True)


def test_a_crop_that_is_not_a_multiple_of_the_patch_size_names_the_key_and_the_flag():
    cfg = load_config_from(DEFAULT_CFG, TINY_SIZES + ["DATA.LOCAL_CROP_SIZE", "20"])
    check_clip_sizes(cfg, 16, train_clips=True)  # no fast clip, no SSL view: LOCAL_CROP_SIZE unused
    for uses in ({"slowfast": True}, {"ssl_views": True}):
        with pytest.raises(ValueError, match=r"DATA\.LOCAL_CROP_SIZE 20 is not a multiple of the patch size 16 "
                                             r"\(--patch_size\): pass DATA\.LOCAL_CROP_SIZE 16"):
            check_clip_sizes(cfg, 16, **uses)
    check_clip_sizes(cfg, 4, slowfast=True)
    cfg = load_config_from(DEFAULT_CFG, TINY_SIZES + ["DATA.TRAIN_JITTER_SCALES", "[16,16]",
                                                      "DATA.TEST_CROP_SIZE", "8"])
    with pytest.raises(ValueError, match=r"DATA\.TEST_CROP_SIZE 8 is not a multiple of the patch size 16 .* "
                                         r"DATA\.TEST_CROP_SIZE 16 or another"):
        check_clip_sizes(cfg, 16)


@pytest.mark.parametrize("script, run, opts, says", [
    ("train_ssl", "train_svt", ["DATA.LOCAL_CROP_SIZE", "20"], r"DATA\.LOCAL_CROP_SIZE 20 is not a multiple"),
    ("eval_linear", "eval_linear", ["DATA.TEST_CROP_SIZE", "64"], r"DATA\.TEST_CROP_SIZE 64 is larger"),
    ("eval_knn", "main", ["DATA.TEST_CROP_SIZE", "64"], r"DATA\.TEST_CROP_SIZE 64 is larger"),
    ("eval_finetune", "eval_finetune", ["DATA.TRAIN_JITTER_SCALES", "[16,16]", "DATA.TEST_CROP_SIZE", "16"],
     r"DATA\.TRAIN_CROP_SIZE 32 is larger .*\[0\] 16 "),
])
def test_every_entry_script_checks_its_clip_sizes_before_any_work(script, run, opts, says, tmp_path):
    """The sizes are checked before any data is read (the lists here do not exist), with the script's --patch_size."""
    with pytest.raises(ValueError, match=says):
        _run_entry(script, run, ["--output_dir", str(tmp_path / "out"), "--opts", *TINY_SIZES, *opts])


class _ConfigLoaded(Exception):
    """Raised by the stand-in for a script's check_clip_sizes: the config is loaded, the run goes no further."""


@pytest.mark.parametrize("script, entry", [("eval_linear", "eval_linear"), ("eval_knn", "main"),
                                           ("eval_finetune", "eval_finetune")])
def test_every_evaluation_script_loads_the_dataset_protocol(script, entry, monkeypatch, tmp_path):
    """The per-dataset protocol defaults (DATASET_OPTS) reach the config each evaluation script runs with: SSv2
    (whose labels tell left from right) trains without flips in the linear probe, the kNN's --train_aug bank and
    the fine-tuning alike, the others with them, and with TimeSformer's inverse-uniform scale jitter; the user's
    --opts win."""
    import importlib
    from datasets import DATASETS
    module = importlib.import_module(script)
    loaded = []

    def capture(cfg, *args, **kwargs):
        loaded.append(cfg)
        raise _ConfigLoaded

    monkeypatch.setattr(module, "check_clip_sizes", capture)
    monkeypatch.setattr(module.utils, "init_distributed_mode", lambda args: None)  # no process group is needed
    parser = argparse.ArgumentParser(parents=[module.get_args_parser()])
    for dataset, opts in [(name, []) for name in DATASETS] + [("ssv2", ["--opts", "DATA.RANDOM_FLIP", "True"])]:
        with pytest.raises(_ConfigLoaded):
            getattr(module, entry)(parser.parse_args(["--dataset", dataset, "--output_dir", str(tmp_path)] + opts))
        assert loaded[-1].DATA.RANDOM_FLIP is (dataset != "ssv2" or bool(opts)), (dataset, opts)
        assert loaded[-1].DATA.INV_UNIFORM_SAMPLE is (dataset == "ssv2"), (dataset, opts)
