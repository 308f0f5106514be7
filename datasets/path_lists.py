"""Compact sequences of paths for lists of hundreds of thousands of videos (Kinetics-400: 240k) or millions of
frames (SSv2's frame lists: ~7.6M JPEGs).

A Python list of path strings is one object per path, and every read of one writes its reference count: a
forked DataLoader worker that reads them copies the memory pages that hold them, so each worker's private
memory grows toward the size of the whole list over an epoch (pytorch/pytorch#13246; SSv2's train frame
lists as lists of strings: ~300 MB per worker per epoch, measured on svt). Here the paths are one str, joined by
NULs, and a numpy array of offsets: a read writes no page of them.
"""
import ctypes
from collections.abc import Iterable, Sequence

import numpy as np

_SEP = "\0"  # no path holds it: POSIX file names cannot, and open() refuses one that does


class PathList(Sequence):
    """An immutable sequence of str paths that reads as the list of them would (negative indices, slices as lists,
    iteration, equality with any sequence of the same strings)."""

    def __init__(self, paths: Iterable[str]):
        paths = paths if isinstance(paths, list) else list(paths)
        # path i is _text[_offsets[i]:_offsets[i + 1] - 1]: each one is followed by a NUL but the last
        self._text = _SEP.join(paths)
        if self._text.count(_SEP) != max(len(paths) - 1, 0):
            bad = next(p for p in paths if _SEP in p)
            raise ValueError(f"path {bad!r} holds a NUL character, which no file name can hold")
        self._offsets = np.zeros(len(paths) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, paths), dtype=np.int64, count=len(paths)) + 1, out=self._offsets[1:])

    @classmethod
    def chain(cls, lists: Iterable["PathList"]) -> "PathList":
        """The paths of `lists` one after the other, joined from their texts: no str per path is made."""
        lists = [p for p in lists if len(p)]  # an empty one holds no path (and the text "")
        chained = cls.__new__(cls)
        chained._text = _SEP.join(p._text for p in lists)
        lengths = np.concatenate([np.diff(p._offsets) for p in lists]) if lists else np.zeros(0, dtype=np.int64)
        chained._offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=chained._offsets[1:])  # each difference is a path's length + 1, as in __init__
        return chained

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            first, stop, step = index.indices(len(self))
            if step == 1 and first < stop:  # one slice of the text for a run of paths
                return self._text[self._offsets[first]:self._offsets[stop] - 1].split(_SEP)
            return [self[i] for i in range(first, stop, step)]
        i = index + len(self) if index < 0 else index
        if not 0 <= i < len(self):
            raise IndexError(f"PathList index {index} out of range ({len(self)} paths)")
        return self._text[self._offsets[i]:self._offsets[i + 1] - 1]

    def __iter__(self):
        offsets = self._offsets.tolist()
        for start, end in zip(offsets[:-1], offsets[1:]):
            yield self._text[start:end - 1]

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # as a list's

    def __repr__(self) -> str:
        return f"PathList({len(self)} paths: {self[:3]}{' ...' if len(self) > 3 else ''})"


class PathLists(Sequence):
    """An immutable sequence of lists of str paths (one list per frame-folder video: its frames in order) held in
    one PathList; item v is the list of video v's paths, a new list at each read. Groups that are PathLists
    are joined from their texts (PathList.chain): building from them holds no str per path."""

    def __init__(self, groups: Iterable[Sequence[str]]):
        groups = list(groups)
        self._bounds = np.zeros(len(groups) + 1, dtype=np.int64)
        np.cumsum([len(g) for g in groups], out=self._bounds[1:])
        self._paths = (PathList.chain(groups) if all(isinstance(g, PathList) for g in groups)
                       else PathList([p for g in groups for p in g]))

    def __len__(self) -> int:
        return len(self._bounds) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = index + len(self) if index < 0 else index
        if not 0 <= i < len(self):
            raise IndexError(f"PathLists index {index} out of range ({len(self)} lists)")
        return self._paths[int(self._bounds[i]):int(self._bounds[i + 1])]

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == list(b) for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"PathLists({len(self)} lists of {len(self._paths)} paths)"


def return_freed_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's malloc_trim; nothing where there is none).

    Building PathLists from SSv2's per-video PathLists frees 169k texts of ~2 KB each: glibc keeps them (~470 MB
    of RSS) while any later allocation sits above them in its heap."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
