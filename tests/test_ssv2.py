"""Something-Something-v2 as the evaluation scripts read it (TimeSformer's layout: annotation JSONs, frame lists,
JPEG frames): what a run records of its data, and the errors of a layout that does not fit."""
import argparse
import json

import pytest
import torch

import eval_finetune
import eval_linear
from datasets import build_dataset, transform
from tests.conftest import build_cfg, write_ssv2
from tests.test_eval_e2e import OPTS, linear
from utils.evaluation import check_same_run, list_fingerprint, run_record
from utils.parser import load_config_from


def _ssv2_sets(root):
    cfg = build_cfg(root, root / "frames")
    return cfg, build_dataset("ssv2", cfg, "train"), build_dataset("ssv2", cfg, "val")


@pytest.mark.parametrize("script, record", [(eval_linear, "probe_run"), (eval_finetune, "finetune_run")])
def test_ssv2_run_record_holds_the_annotation_jsons(tmp_path, script, record):
    """SSv2's frame lists hold no labels: a resume after the labels JSON's class ids changed (here reversed), or
    after the validation JSON lost a video, is refused as a changed Kinetics list is, naming the file."""
    write_ssv2(tmp_path)
    args = argparse.ArgumentParser(parents=[script.get_args_parser()]).parse_args(["--dataset", "ssv2"])
    run = getattr(script, record)(args, *_ssv2_sets(tmp_path))
    assert {"labels json", "train json", "validation json"} <= set(run)
    labels = tmp_path / "something-something-v2-labels.json"
    mapping = json.loads(labels.read_text())
    labels.write_text(json.dumps(dict(zip(mapping, reversed(mapping.values())))))
    reversed_ids = getattr(script, record)(args, *_ssv2_sets(tmp_path))
    assert reversed_ids["train list"] == run["train list"]  # the frame lists are the same
    with pytest.raises(ValueError, match=r"holds another linear probe run: labels json: checkpoint \S+labels.json "
                                         r"\(sha1 \w{12}\), this run \S+labels.json \(sha1 \w{12}\)\. Resuming"):
        check_same_run(run, reversed_ids, "ckpt", "linear probe", "hint")
    labels.write_text(json.dumps(mapping))
    validation = tmp_path / "something-something-v2-validation.json"
    validation.write_text(json.dumps(json.loads(validation.read_text())[:2]))
    subset = getattr(script, record)(args, *_ssv2_sets(tmp_path))
    with pytest.raises(ValueError, match=r"holds another linear probe run: validation json: checkpoint \S+validation"):
        check_same_run(run, subset, "ckpt", "linear probe", "hint")
    check_same_run(subset, getattr(script, record)(args, *_ssv2_sets(tmp_path)), "ckpt", "linear probe", "hint")


def test_ssv2_wrong_prefix_fails_at_build_naming_it(tmp_path):
    """A DATA.PATH_PREFIX under which no first frame of the frame lists exists fails when the dataset is built,
    naming the prefix and a frame path, not after num_retries failed samples in the middle of a run."""
    write_ssv2(tmp_path)
    wrong = tmp_path / "videos"
    with pytest.raises(FileNotFoundError, match=rf"train.csv: none of the first frames of 3 checked videos exists, "
                                                rf"e.g. '{wrong}/100/000000.jpg' \(DATA.PATH_PREFIX='{wrong}' joined "
                                                r"to the frame list's path column\)\. Set DATA.PATH_PREFIX to the "
                                                r"folder of the extracted JPEG frames"):
        build_dataset("ssv2", build_cfg(tmp_path, wrong), "train")


def test_ssv2_frames_failing_in_a_row_name_the_frames(tmp_path):
    """Frames that the frame lists name but that are not on disk: the error after num_retries names the frames
    and counts the missing ones (not the video ids, which are no files), with no check_videos command (it reads
    video lists, not frame lists)."""
    write_ssv2(tmp_path)
    for frame in (tmp_path / "frames").glob("*/*.jpg"):
        if int(frame.stem) >= 3:  # the first frames stay: the prefix is right
            frame.unlink()
    train = build_dataset("ssv2", build_cfg(tmp_path, tmp_path / "frames"), "train", num_retries=2)
    failed = (r"ssv2: the 3 draws of a sample \(num_retries=2\) all failed, as 3 of the 3 draws of this loader "
              r"process did \(100%\): the list is \(almost\) entirely unreadable\. The ([123]) frames that failed, "
              r"\1 of them missing")
    with pytest.raises(RuntimeError, match=failed + r" on disk: \['\S+/1\d\d/0000\d\d.jpg'") as err:
        train[0]
    assert "check_videos" not in str(err.value) and "DATA.PATH_PREFIX" in str(err.value)


def test_ssv2_test_clips_are_resized_to_the_crop_size_also_with_one_crop(tmp_path, monkeypatch):
    """TimeSformer's ssv2.py resizes every test clip to short side TEST_CROP_SIZE (then the centre crop with
    TEST.NUM_SPATIAL_CROPS 1); Kinetics' 1-crop test keeps the val clip's short side TRAIN_JITTER_SCALES[0]."""
    write_ssv2(tmp_path)
    boxes = []
    real = transform.eval_crop_box

    def spy(*args):
        boxes.append(real(*args))
        return boxes[-1]

    monkeypatch.setattr(transform, "eval_crop_box", spy)
    cfg = build_cfg(tmp_path, tmp_path / "frames", **{"TEST.NUM_SPATIAL_CROPS": 1})  # 48x40 frames, crops 32
    for mode in ("val", "test"):
        assert build_dataset("ssv2", cfg, mode)[0][0].shape == (3, 4, 32, 32)
    assert boxes == [((36, 43), (2, 6), False), ((32, 38), (0, 3), False)]


def test_ssv2_annotated_videos_without_frames_are_counted_and_named(tmp_path):
    """Annotated videos missing from the frame list: the error counts them, names a few and says the fix (not the
    first one alone)."""
    write_ssv2(tmp_path, num_videos=4)
    frame_list = tmp_path / "train.csv"
    lines = frame_list.read_text().splitlines()
    frame_list.write_text("\n".join(line for line in lines if not line.startswith(("101 ", "103 "))) + "\n")
    with pytest.raises(ValueError, match=r"something-something-v2-train.json: 2 of its 4 videos have no frames in "
                                         rf"{frame_list}, e.g. \['101', '103'\]\. Use the frame list of this split "
                                         r".*or, to use a subset, remove them from the JSON"):
        build_dataset("ssv2", build_cfg(tmp_path, tmp_path / "frames"), "train")


def test_ssv2_empty_annotation_json_is_named(tmp_path):
    """A split JSON with no videos: an error naming it and the official file, not an IndexError."""
    write_ssv2(tmp_path)
    (tmp_path / "something-something-v2-validation.json").write_text("[]")
    with pytest.raises(ValueError, match=r"something-something-v2-validation.json lists no videos: the val split of "
                                         r"SSv2 is something-something-v2-validation.json"):
        build_dataset("ssv2", build_cfg(tmp_path, tmp_path / "frames"), "val")


def test_ssv2_test_json_as_validation_is_named(tmp_path):
    """The official test JSON (ids only) put in place of the validation JSON: an error naming the file and saying
    the test JSON has no labels, not a bare KeyError 'template'."""
    write_ssv2(tmp_path)
    (tmp_path / "something-something-v2-validation.json").write_text(json.dumps([{"id": "100"}, {"id": "101"}]))
    with pytest.raises(ValueError, match=r"something-something-v2-validation.json: video '100' has no 'template' "
                                         r"\(its label\): this is the shape of the SSv2 test JSON \(ids only, no "
                                         r"labels\)"):
        build_dataset("ssv2", build_cfg(tmp_path, tmp_path / "frames"), "val")


def test_linear_probe_end_to_end_on_ssv2(tmp_path, monkeypatch, capsys):
    """eval_linear.py on a tiny SSv2 layout (JSONs, frame lists, JPEG frames) with a 2-block ViT-Ti: every split has
    its clips (4 videos; the test 3 crops each, at short side TEST_CROP_SIZE), no training clip is flipped and
    their short side is drawn inverse-uniformly (SSv2's protocol, without any --opts), and a rerun after the labels
    JSON's ids changed is refused instead of resumed."""
    root = tmp_path / "ssv2"
    root.mkdir()
    write_ssv2(root, num_videos=4)
    calls = []
    real = transform.eval_crop_box

    def spy(height, width, spatial_idx, min_scale, max_scale, crop, random_flip, inverse_uniform=False):
        box = real(height, width, spatial_idx, min_scale, max_scale, crop, random_flip, inverse_uniform)
        calls.append({"spatial_idx": spatial_idx, "short": min(box[0]), "random_flip": random_flip,
                      "inverse_uniform": inverse_uniform, "flipped": box[2]})
        return box

    monkeypatch.setattr(transform, "eval_crop_box", spy)
    out = tmp_path / "probe"
    args = ["--arch", "vit_tiny", "--n_last_blocks", "1", "--epochs", "2", "--batch_size_per_gpu", "4",
            "--num_workers", "0", "--dataset", "ssv2", "--output_dir", str(out),
            "--opts", "DATA.PATH_TO_DATA_DIR", str(root), "DATA.PATH_PREFIX", str(root / "frames")] + OPTS
    stats = linear(args)
    assert "Data loaded: 4 train clips, 4 val clips, 12 test clips (3 per video); 2 classes." in capsys.readouterr().out
    assert (stats["num_videos"], stats["num_clips_per_video"], stats["skipped_videos"]) == (4, 3, 0)
    train = [c for c in calls if c["spatial_idx"] == -1]
    assert len(train) == 2 * 4  # 2 epochs of the 4 training videos
    assert not any(c["random_flip"] or c["flipped"] for c in train) and all(c["inverse_uniform"] for c in train)
    assert all(36 <= c["short"] <= 40 for c in train)
    test = [c for c in calls if c["spatial_idx"] in (0, 2)]  # the 3-crop test's side crops, at TEST_CROP_SIZE
    assert len(test) == 2 * 4 and all(c["short"] == 32 for c in test)
    assert set(torch.load(out / "checkpoint.pth.tar", weights_only=False)["run"]) >= {"labels json", "train json"}

    torch.distributed.destroy_process_group()
    labels = root / "something-something-v2-labels.json"
    labels.write_text(json.dumps(dict(zip(json.loads(labels.read_text()), ["1", "0"]))))
    with pytest.raises(ValueError, match=r"holds another linear probe run: labels json: checkpoint"):
        linear(args)


def test_ssv2_split_with_no_readable_video_points_at_the_frames(tmp_path):
    """No SSv2 video readable: the advice is the frames folder and the frame lists, not check_videos (which reads
    video lists, not frame lists)."""
    from utils.evaluation import UnreadableSplit, unreadable_videos
    write_ssv2(tmp_path)
    _, _, val = _ssv2_sets(tmp_path)
    all_skipped = torch.full((len(val),), -1)
    with pytest.raises(UnreadableSplit, match=r"none of the 3 videos of .*val.csv .* could be read; check that "
                                              r"DATA.PATH_PREFIX is the folder of the extracted frames") as error:
        unreadable_videos(val, all_skipped)
    assert "check_videos" not in str(error.value)


def test_a_run_record_of_before_a_key_is_checked_against_its_old_value(tmp_path, capsys):
    """A checkpoint whose run record predates DATA.INV_UNIFORM_SAMPLE sampled uniformly: resumed with it on, the
    resume is refused (not a silent switch of protocol mid-run); off, it resumes. A key with no known earlier value
    (an SSv2 labels JSON a record did not hold yet) is named in a note, not skipped in silence."""
    cfg = load_config_from(None, ["DATA.INV_UNIFORM_SAMPLE", "True"])
    run = run_record(argparse.Namespace(slowfast_eval=False), cfg, ("slowfast_eval",), {})
    old = {key: value for key, value in run.items() if key != "DATA.INV_UNIFORM_SAMPLE"}
    with pytest.raises(ValueError, match=r"DATA.INV_UNIFORM_SAMPLE: checkpoint False, this run True"):
        check_same_run(old, run, "ckpt", "fine-tuning", "hint")
    check_same_run(old, {**run, "DATA.INV_UNIFORM_SAMPLE": False}, "ckpt", "fine-tuning", "hint")
    check_same_run(run, run, "ckpt", "fine-tuning", "hint")  # a record that holds the key: its own value counts
    assert "Note" not in capsys.readouterr().out
    (tmp_path / "labels.json").write_text("{}")
    with_json = {**old, "DATA.INV_UNIFORM_SAMPLE": False,
                 "labels json": list_fingerprint(str(tmp_path / "labels.json"))}
    check_same_run(old, with_json, "ckpt", "fine-tuning", "hint")
    assert "ckpt's run record has no labels json (written by an older svt): resuming without checking them" in \
        capsys.readouterr().out
