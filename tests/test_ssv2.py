"""Something-Something-v2 as the evaluation scripts read it (TimeSformer's layout: annotation JSONs, frame lists,
JPEG frames): what a run records of its data, and the errors of a layout that does not fit."""
import argparse
import json

import pytest

import eval_finetune
import eval_linear
from datasets import build_dataset
from tests.conftest import build_cfg, write_ssv2
from utils.evaluation import check_same_run


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
