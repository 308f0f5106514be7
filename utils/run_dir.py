"""The output folder of a training run across its starts (train_ssl.py; eval_linear.py and eval_finetune.py, which
keep no numbered checkpoints): a start from scratch never writes into another run's folder, log.txt holds
each epoch of the resumed run once, a damaged own checkpoint names the way on, and the config files of an earlier
start are kept when this one's differ."""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from utils import utils
from utils.checkpoint import IncompleteFileError, atomic_write_text, safe_torch_load

NUMBERED_GLOB = "checkpoint[0-9][0-9][0-9][0-9].pth"
LOG_NAME = "log.txt"
SET_ASIDE = LOG_NAME + ".before_resume"


def numbered_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The checkpointNNNN.pth files of `folder`, oldest epoch first."""
    return sorted(Path(folder).glob(NUMBERED_GLOB))


def newest_readable_checkpoint(folder: str | os.PathLike) -> tuple[Path, int] | None:
    """The newest checkpointNNNN.pth of `folder` that torch.save completed, with the epoch it resumes at; None when
    there is none. Each file is memory-mapped (safe_torch_load's mmap): a look costs its pickle, not its size."""
    for path in reversed(numbered_checkpoints(folder)):
        try:
            return path, safe_torch_load(path, mmap=True)["epoch"]
        except (IncompleteFileError, KeyError, TypeError):
            continue
    return None


def is_own_numbered(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether `path` is one of `folder`'s checkpointNNNN.pth files (links followed)."""
    path = Path(path).resolve()
    return path.parent == Path(folder).resolve() and path.match(NUMBERED_GLOB)


def left_files(folder: str | os.PathLike, results: tuple[str, ...] = ()) -> list[str]:
    """What an earlier run left in `folder` that a new run there would append to, overwrite or mix with, as the
    refusals name it for deletion: log.txt, log.txt.before_resume (or the new run's set-aside lines would join
    the old run's), the checkpointNNNN.pth files, the `results` files (an evaluation's results) and tb/ (its
    TensorBoard event files), each when there."""
    folder = Path(folder)
    there = [(LOG_NAME, (folder / LOG_NAME).is_file()), (SET_ASIDE, (folder / SET_ASIDE).is_file()),
             ("checkpointNNNN.pth files", bool(numbered_checkpoints(folder)))]
    there += [(name, (folder / name).is_file()) for name in results]
    return [name for name, present in there + [("tb/", (folder / "tb").is_dir())] if present]


def delete_to_restart(checkpoint: str | os.PathLike, results: tuple[str, ...] = ()) -> str:
    """What to delete to start a new run in the folder of a run's own `checkpoint` that another run wrote (the
    advice of the errors that refuse to resume it): the checkpoint and what check_fresh_start would then refuse to
    start next to (left_files, with the run's `results`), e.g. "out/checkpoint.pth and its log.txt, tb/"."""
    left = left_files(Path(checkpoint).parent, results)
    return f"{checkpoint}" + (f" and its {', '.join(left)}" if left else "")


def check_fresh_start(folder: str | os.PathLike, resume_from: str | os.PathLike | None = None,
                      checkpoint: str = "checkpoint.pth", results: tuple[str, ...] = ()) -> None:
    """A start that does not resume `folder`'s `checkpoint` (there is none) -- from scratch, or from a
    `resume_from` that is not one of the folder's own numbered checkpoints -- where another run left its log.txt,
    numbered checkpoints or `results` files (an evaluation's) would append to that log, overwrite those files and
    add its curves to that run's tb/: an error naming the folder, what is there and the ways on."""
    folder = Path(folder)
    if resume_from is not None and is_own_numbered(folder, resume_from):
        return  # that run goes on (tidy_epoch_log sets aside the log lines of the epochs it trains again)
    numbered = numbered_checkpoints(folder)
    log = (folder / LOG_NAME).is_file()
    outputs = [name for name in results if (folder / name).is_file()]
    found = ([LOG_NAME] if log else []) + [p.name for p in numbered] + outputs
    if not found:
        return
    listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    start = "starting from scratch" if resume_from is None else f"continuing --resume_from {resume_from}"
    run = "a new run" if resume_from is None else "this run"
    newest = newest_readable_checkpoint(folder) if numbered else None
    resume = (f", or continue that run from its newest readable numbered checkpoint with --resume_from {newest[0]} "
              f"(it resumes at epoch {newest[1]}: the epochs from {newest[1]} on are trained again)" if newest else "")
    overwritten = (["numbered checkpoints"] if numbered else []) + outputs
    harms = [text for text, there in (("append to its log.txt", log),
                                      (f"overwrite its {', '.join(overwritten)}", overwritten),
                                      ("add this run's curves to its tb/", (folder / "tb").is_dir())) if there]
    harm = ", ".join(harms[:-1]) + " and " * (len(harms) > 1) + harms[-1]
    raise FileExistsError(f"--output_dir {folder} holds another run ({listed}) but no {checkpoint} to resume: "
                          f"{start} there would {harm}. Pass another --output_dir for {run}{resume}, or delete its "
                          f"{', '.join(left_files(folder, results))} to start {run} there.")


TB_NAME = "tb"
TB_EVENTS = "events.out.tfevents.*"  # the files a SummaryWriter writes


def set_aside_tensorboard(folder: str | os.PathLike) -> Path | None:
    """At a start from scratch that check_fresh_start let through (no checkpoint to resume, no log.txt): the
    tensorboard event files an earlier start killed before its first checkpoint left in `folder`/tb (TensorBoard
    would show their curves and this run's as one run) move to tb.<UTC time of the newest>/ (a run of its own
    there), with a note. Only the event files move; returns where, or None when there were none."""
    tb = Path(folder) / TB_NAME
    events = sorted(tb.glob(TB_EVENTS)) if tb.is_dir() else []
    if not events:
        return None
    newest = max(event.stat().st_mtime for event in events)
    stamp = datetime.datetime.fromtimestamp(newest, datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside, n = tb.with_name(f"{TB_NAME}.{stamp}"), 1
    while aside.exists():
        aside, n = tb.with_name(f"{TB_NAME}.{stamp}-{n}"), n + 1
    aside.mkdir()
    for event in events:
        os.replace(event, aside / event.name)
    print(f"Note: {tb} held the tensorboard curves of an earlier start that stopped before its first checkpoint: "
          f"moved them to {aside}, so that {tb} holds this run's alone.")
    return aside


def _record(line: str) -> dict | None:
    """A log.txt line as its JSON record, or None when it is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_epoch_log(folder: str | os.PathLike) -> list[dict]:
    """The records of `folder`/log.txt; a line that is not a JSON record (glued to a partial line an earlier kill
    left) is skipped with a note naming its line number."""
    log = Path(folder) / LOG_NAME
    records = []
    if not log.is_file():
        return records
    for number, line in enumerate(log.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = _record(line)
        if record is None:
            print(f"Note: {log}:{number} is not a JSON record, skipped: {line[:80]!r}")
            continue
        records.append(record)
    return records


def has_epoch_line(folder: str | os.PathLike, epoch: int) -> bool:
    """Whether `folder`/log.txt holds a record of `epoch`."""
    return epoch in {record.get("epoch") for record in read_epoch_log(folder)}


def write_missing_epoch_line(folder: str | os.PathLike, epoch_log: dict | None, writer=None) -> None:
    """On the main process, at a resume from an epoch-end checkpoint that carries its epoch's log record
    (`epoch_log`; None: a mid-epoch or older checkpoint): write that line (and its tensorboard scalars to `writer`)
    when log.txt lacks it, as a kill between the checkpoint and the line leaves it. After tidy_epoch_log."""
    if epoch_log is None or not utils.is_main_process() or has_epoch_line(folder, epoch_log["epoch"]):
        return
    utils.write_epoch_log(folder, epoch_log, writer)
    print(f"Wrote the log.txt line of epoch {epoch_log['epoch']}, missing after an interrupted end of epoch.")


def tidy_epoch_log(folder: str | os.PathLike, start_epoch: int) -> None:
    """Before a run that starts at `start_epoch` appends to log.txt: drop a partial last line (a kill while it was
    written) and move the lines of epochs from `start_epoch` on to log.txt.before_resume (a resume from an older
    checkpoint trains those epochs again; from scratch, at 0, every record goes: an earlier start's), each with a
    note. Lines that are not records stay (read_epoch_log skips them). Each file is rewritten atomically (a temporary
    file renamed over it), and a line already at the end of log.txt.before_resume is not added again (a start killed
    between the two writes)."""
    log = Path(folder) / LOG_NAME
    if not log.is_file():
        return
    text = log.read_text()
    kept = text
    if text and not text.endswith("\n"):
        cut = text.rfind("\n") + 1
        print(f"Note: {log} ended with a partial line (the run was killed while writing it); dropped: "
              f"{text[cut:][:80]!r}")
        kept = text[:cut]
    lines, later = [], []
    for line in kept.splitlines(keepends=True):
        record = _record(line)
        epoch = record.get("epoch") if record is not None else None
        # from scratch every record is an earlier run's (an evaluation's test line too, which has no epoch)
        later_epoch = record is not None and (start_epoch == 0 or isinstance(epoch, int) and epoch >= start_epoch)
        (later if later_epoch else lines).append(line)
    if later:
        aside = log.with_name(SET_ASIDE)
        before, moved = (aside.read_text() if aside.is_file() else ""), "".join(later)
        if not before.endswith(moved):  # else a start killed before it rewrote log.txt moved them already
            atomic_write_text(before + moved, aside)
        epochs = sorted({_record(line).get("epoch") for line in later} - {None})
        start = (f"resumes at epoch {start_epoch}" if start_epoch else "starts from scratch")
        run = "a run that went on past the checkpoint resumed" if start_epoch else "an earlier start"
        print(f"Note: this run {start}, but {log} has lines of epochs {epochs} (of {run}): moved them to {aside}, so "
              "that log.txt holds each epoch once.")
    if kept != text or later:
        atomic_write_text("".join(lines), log)


def damaged_own_checkpoint(path: Path, restart_here: bool = False, results: tuple[str, ...] = ()) -> str:
    """The error for a run's own checkpoint that torch.save did not complete: how that happens, and the exact way on:
    from the newest numbered checkpoint that reads, else a start again from epoch 0 -- in another folder, or, when
    `restart_here` (the evaluations, which keep no numbered checkpoints), in this one once the damaged file is moved
    aside and what check_fresh_start would refuse a new run next to (left_files, with the run's `results`) is
    deleted."""
    damaged = (f"{path} is damaged: it is not a complete torch.save file. This run's checkpoints are written "
               "atomically, so the machine died during a write on a file system without an atomic rename, or the file "
               "was cut by a copy.")
    newest = newest_readable_checkpoint(path.parent)
    if newest:
        numbered, epoch = newest
        return (f"{damaged} The newest readable numbered checkpoint is {numbered}, which resumes at epoch {epoch}: "
                f"move the damaged file aside (mv {path} {path}.damaged) and rerun with --resume_from {numbered} (the "
                f"epochs from {epoch} on are trained again).")
    if restart_here:
        left = left_files(path.parent, results)
        delete = f" and delete its {', '.join(left)}" if left else ""
        return (f"{damaged} This run keeps no other checkpoint, so its training is lost: start it again from epoch 0 "
                f"in another --output_dir, or move the damaged file aside (mv {path} {path}.damaged){delete} and rerun "
                f"to start it again in {path.parent}.")
    return (f"{damaged} {path.parent} has no readable checkpointNNNN.pth to continue from: start again in another "
            "--output_dir.")


def read_own_checkpoint(path: str | os.PathLike, restart_here: bool = False, results: tuple[str, ...] = ()) -> Any:
    """safe_torch_load of a run's own checkpoint: a file torch.save did not complete is an error naming the way on
    (damaged_own_checkpoint), not the advice to download it again."""
    try:
        return safe_torch_load(path)
    except IncompleteFileError as err:
        raise IncompleteFileError(damaged_own_checkpoint(Path(path), restart_here, results)) from err


def write_config_files(folder: str | os.PathLike, files: dict[str, str]) -> None:
    """Write this start's config files ({name: text}); an earlier one with other content is kept as
    <stem>.<its UTC time><suffix> (e.g. config.20250101T120000Z.txt), with a note, so the folder records how each
    part of the run was configured. A file is written atomically: a kill never leaves a partial one to keep."""
    for name, text in files.items():
        path = Path(folder) / name
        if path.is_file():
            if path.read_text() == text:
                continue
            written = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
            stamp = written.strftime("%Y%m%dT%H%M%SZ")
            kept, n = path.with_name(f"{path.stem}.{stamp}{path.suffix}"), 1
            while kept.exists():
                kept, n = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}"), n + 1
            os.replace(path, kept)
            print(f"Note: {path} of an earlier start differs from this one's: kept as {kept.name}.")
        atomic_write_text(text, path)
