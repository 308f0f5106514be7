"""The fvcore config: defaults, YAML, --opts overrides and their errors."""
import argparse

import pytest

from utils.parser import DEFAULT_CFG, add_config_args, load_config, load_config_from

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


@pytest.mark.parametrize("key", ["DATA.USE_FLOW", "MODEL.TWO_STREAM", "MODEL.TWO_TOKEN", "DATA.RAND_CONV"])
def test_unported_experimental_branches_fail_clearly(key):
    with pytest.raises(ValueError, match="not supported in this reimplementation"):
        load_config_from(DEFAULT_CFG, [key, "True"])


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
