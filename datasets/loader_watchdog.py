"""A decode that never returns, named instead of hanging the run. decord's get_batch spins forever in native code
on some ordinary H.264 files (dmlc/decord issues 269, 373, 375), holding the GIL: no signal handler or timer in the
worker can end it, and without a limit the training process waits for its batch forever, with no message (a job of
several processes until --dist_timeout, naming only the rank; its resume reaches the same sample and hangs again).

Each loader worker notes in shared memory which video it reads and since when (`DecodeSlots`: three scalar writes
per video, read only when a batch is late). `WatchedLoader` waits at most --decode_timeout minutes for each batch
(the DataLoader's own `timeout`), then stops its workers, ends those still stuck (torch's SIGTERM, SIGKILL if that
failed) and raises DecodeHang naming the videos read longest, the backend, how long, and the fix. In a job of
several processes that rank exits with the error and the launcher stops the others (utils.named_rank_failures hands
the error to torchrun's summary). The limit needs loader workers: with --num_workers 0 the decode runs in the
training thread itself, where nothing can interrupt it.

With DATA.DECODE_DEVICE cuda the workers only probe and read bytes; the videos are decoded in the training
process, in the decode threads of datasets/device_views.py (DeviceViews). The training thread waits at most
--decode_timeout minutes for each video (torchcodec and PyAV release the GIL while they decode, so the wait can run
out), then raises DecodeHang naming the videos the threads decode, their decoder and the fix (`stuck_videos_message`
words both errors). A thread stuck in native code cannot be stopped, and the interpreter joins such threads at
exit: that error is marked `stuck_threads`, and utils.named_rank_failures ends the process (os._exit) once it has
named it.
"""
import os
import shlex
import time

import torch
from torch.utils.data import DataLoader, get_worker_info

from datasets.video_dataset import video_dataset_of


class DecodeHang(TimeoutError):
    """No batch within --decode_timeout; the message names the videos being read. Not a RuntimeError, which
    utils.named_rank_failures would take for a failed collective when the message says "timeout".
    `stuck_threads`: threads of this process are still stuck in the decode (DeviceViews' decode threads, which
    nothing can stop and which the interpreter would join at exit), so utils.named_rank_failures ends the process
    with os._exit after naming the error."""

    def __init__(self, message: str, stuck_threads: bool = False):
        super().__init__(message)
        self.stuck_threads = stuck_threads


class DecodeSlots:
    """One row per loader worker in shared memory, written by the workers (forked or spawned: it travels with the
    dataset) and read by the training process: (video index, or -1 between videos; time.time() at its start)."""

    def __init__(self, num_workers: int):
        self.table = torch.full((num_workers, 2), -1.0, dtype=torch.float64).share_memory_()

    def begin(self, video: int) -> None:
        """In a loader worker: it starts reading `video` (an index of the dataset's video list). Elsewhere nothing."""
        worker = get_worker_info()
        if worker is not None:
            self.table[worker.id, 1] = time.time()
            self.table[worker.id, 0] = video

    def end(self) -> None:
        """In a loader worker: its sample is done."""
        worker = get_worker_info()
        if worker is not None:
            self.table[worker.id, 0] = -1

    def busy(self) -> list[tuple[int, float]]:
        """(video, seconds since it started) of each worker reading one, the longest first."""
        now = time.time()
        return sorted(((int(v), now - t) for v, t in self.table.tolist() if v >= 0), key=lambda row: -row[1])


class WatchedLoader(DataLoader):
    """A DataLoader whose workers report the video each reads and which waits at most `decode_timeout` minutes
    for a batch (0: forever; no limit without workers), then raises DecodeHang (see the module docstring)."""

    def __init__(self, dataset, *args, decode_timeout: float, **kwargs):
        workers = kwargs.get("num_workers", 0)
        super().__init__(dataset, *args, timeout=decode_timeout * 60 if workers else 0, **kwargs)
        self.videos = video_dataset_of(dataset)
        self.slots = DecodeSlots(workers) if self.timeout and self.videos is not None else None

    def __iter__(self):
        if self.slots is None:
            return super().__iter__()
        self.videos.decode_slots = self.slots  # before the workers start: they fork or unpickle the dataset
        return self._watched(super().__iter__())

    def _watched(self, batches):
        try:
            yield from batches
        except RuntimeError as err:
            if not str(err).startswith("DataLoader timed out after"):  # its `timeout` (a worker's error differs)
                raise
            message = self.hang_message()
            # The workers' shutdown first: it unregisters them from the DataLoader's SIGCHLD check, which would
            # raise in this process when a worker is killed. It waits 5 s for each, then sends SIGTERM, which
            # torch's handler in the worker obeys in C (_exit), GIL or not (measured on torch 2.14: a worker in a
            # GIL-holding sleep ends at once); SIGKILL for any that outlived it.
            batches._shutdown_workers()
            for worker in batches._workers:
                if worker.is_alive():
                    worker.kill()
                    worker.join()
            self._iterator = None  # a persistent one: the next pass starts new workers
            raise DecodeHang(message) from None

    def hang_message(self) -> str:
        """What DecodeHang says: the videos read longest and the way on."""
        busy, videos, data = self.slots.busy(), self.videos, self.videos.cfg.DATA
        head = f"No batch came from the DataLoader workers within --decode_timeout {self.timeout / 60:g} min"
        if not busy:
            return (f"{head}, and none of them is reading a video: they are stuck elsewhere (e.g. in a collate or a "
                    "file system that stopped answering). If they were only slow, raise --decode_timeout (0: wait "
                    "forever).")
        if videos.frame_paths is not None:  # SSv2: an item is a video id whose frames PIL reads, no video file
            folders = [(os.path.dirname(videos.frame_paths[v][0]), videos.video_paths[v], s) for v, s in busy]
            rows = "\n".join(f"  {folder} (video {vid}): {s / 60:.1f} min" for folder, vid, s in folders[:3])
            stuck = shlex.quote(folders[0][0])
            return (f"{head}. The frame folders the workers are reading (JPEG frames, with PIL), the longest first:"
                    f"\n{rows}\nA JPEG read that never returns is a file system that stopped answering (a network "
                    f"or FUSE mount); the stuck workers were killed. Check that the first folder's frames can be read "
                    f"(cat {stuck}/* > /dev/null), then rerun the same command (a training run resumes from its last "
                    "checkpoint). If the reads were only slow, raise --decode_timeout (0: wait forever).")
        if videos.ssl_plans and not videos.decode_plans:  # the workers probe and read bytes; the GPU decodes
            reader = "PyAV (its probe and a read of the bytes: DATA.DECODE_DEVICE cuda)"
            switch = "decode on the CPU (--opts DATA.DECODE_DEVICE cpu)"
        else:
            other = "pyav" if videos.backend != "pyav" else "torchcodec"
            reader = f"{videos.backend} (DATA.DECODING_BACKEND {data.DECODING_BACKEND})"
            switch = f"decode with another backend (--opts DATA.DECODING_BACKEND {other})"
        why = ("A decode that never returns is a known failure of some files (decord's get_batch spins forever on a "
               "few ordinary H.264 mp4s: dmlc/decord issues 269, 373, 375); the stuck workers were killed.")
        return stuck_videos_message(f"{head}. The videos the workers are reading, with {reader}",
                                    [(videos.video_paths[v], s) for v, s in busy], why, switch)


def stuck_videos_message(head: str, busy: list[tuple[str, float]], why: str, switch: str) -> str:
    """What DecodeHang says of videos whose decode did not return: `head` (what waited, how long, who decodes the
    videos with what), `busy` (path, seconds since its decode began) the longest first, `why` (the likely cause
    and what became of the stuck readers) and the way on: delete or re-encode the first video, or `switch`."""
    stuck = shlex.quote(busy[0][0])
    rows = "\n".join(f"  {path}: {s / 60:.1f} min" for path, s in busy[:3])
    return (f"{head}, the longest first:\n{rows}\n{why} Delete {stuck} (a missing video is skipped and counted like "
            f"any unreadable one; the list stays as it is) or re-encode it in place (ffmpeg -i {stuck} -c:v libx264 "
            f"-an fixed.mp4, then move fixed.mp4 over it), or {switch}; then rerun the same command (a training run "
            "resumes from its last checkpoint). If the decode was only slow (long 4K videos on a slow file system), "
            "raise --decode_timeout (0: wait forever).")
