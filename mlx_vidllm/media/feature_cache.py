"""Streaming frame decoding and an on-disk cache of per-frame vision features.

Long videos (an hour at 1 fps is 3600 frames) are decoded one frame at a time,
encoded in small batches and appended to a file, so memory stays flat in the
video's length. The file is keyed by the video's content digest and by
everything that determines the features (the vision encoder's weights and
config, preprocessing, frame sampling), so asking a second question about the
same video skips decoding and the vision encoder entirely.

Layout: `<root>/<key>/features.bin` (raw row-major (T, N, D) array) and
`meta.json`. bfloat16 features are stored bit-exact as uint16. Entries are
written to a temporary folder and renamed into place, so a crash never leaves
a half-written entry behind. The root is `$MLX_VIDLLM_CACHE` or
`~/.cache/mlx-vidllm/features`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import mlx.core as mx
import numpy as np
from PIL import Image

from .video import _TRANSPOSE, VideoError, _ccw_rotation, _decoded, _open

CACHE_ENV = "MLX_VIDLLM_CACHE"
FORMAT_VERSION = 1

_STORED = {  # mx dtype name -> numpy dtype of the stored bytes
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
}


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx-vidllm" / "features"


_DIGESTS: dict[tuple, str] = {}  # (real path, size, mtime) -> digest: hash each file once per process


def file_digest(path: str | os.PathLike, chunk: int = 4 << 20) -> str:
    """SHA-256 of the file's bytes (read in chunks; remembered while the file's size and mtime stay the same)."""
    st = os.stat(path)
    memo = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def iter_frames(path: str | os.PathLike, indices: Iterable[int],
                transform: Callable[[Image.Image], Image.Image] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Decode the frames at sorted decode-order `indices`, yielding (index, uint8 (H, W, 3)) one at a time.

    Frames are rotated upright, then `transform`ed right away; indices past the real end of the stream
    are silently skipped (the caller sees fewer frames)."""
    p = os.fspath(path)
    wanted = sorted({int(i) for i in indices})
    if not wanted:
        return
    container, stream = _open(p)
    with container:
        k = 0
        for i, frame in enumerate(_decoded(container, stream, p)):
            if i < wanted[k]:
                continue
            img = frame.to_image()
            ccw = _ccw_rotation(frame, stream)
            if ccw in _TRANSPOSE:
                img = img.transpose(_TRANSPOSE[ccw])
            if transform is not None:
                img = transform(img)
            yield i, np.asarray(img.convert("RGB"), dtype=np.uint8)
            k += 1
            if k == len(wanted):
                return


@dataclass
class CachedFeatures:
    """Per-frame features (T, tokens, dims) stored on disk; read back in chunks, never all at once."""

    folder: Path
    num_frames: int
    tokens: int
    dims: int
    dtype: str  # mx dtype name
    indices: list[int] = field(default_factory=list)

    @property
    def file(self) -> Path:
        return self.folder / "features.bin"

    def __len__(self) -> int:
        return self.num_frames

    def read(self, start: int, stop: int) -> mx.array:
        """Frames [start, stop) as an mx.array (n, tokens, dims)."""
        stop = min(stop, self.num_frames)
        np_dtype = _STORED[self.dtype]
        per_frame = self.tokens * self.dims
        count = max(stop - start, 0) * per_frame
        offset = start * per_frame * np.dtype(np_dtype).itemsize
        data = np.fromfile(self.file, dtype=np_dtype, count=count, offset=offset)
        if data.size != count:
            raise VideoError(f"{self.file}: feature cache entry is truncated; delete {self.folder} and retry")
        arr = mx.array(data.reshape(stop - start, self.tokens, self.dims))
        return arr.view(mx.bfloat16) if self.dtype == "bfloat16" else arr

    def chunks(self, size: int) -> Iterator[mx.array]:
        for start in range(0, self.num_frames, size):
            yield self.read(start, start + size)


class FeatureCache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def lookup(self, key: str) -> CachedFeatures | None:
        folder = self.root / key
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("format") != FORMAT_VERSION or meta.get("dtype") not in _STORED:
            return None
        entry = CachedFeatures(folder, meta["num_frames"], meta["tokens"], meta["dims"], meta["dtype"],
                               meta.get("indices", []))
        expected = entry.num_frames * entry.tokens * entry.dims * np.dtype(_STORED[entry.dtype]).itemsize
        if not entry.file.exists() or entry.file.stat().st_size != expected:
            return None
        return entry

    def build(self, key: str, batches: Iterable[tuple[list[int], mx.array]],
              info: dict | None = None) -> CachedFeatures:
        """Append each batch of features (n, tokens, dims), as it comes, to a new entry `key`."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            num, shape, dtype, indices = 0, None, None, []
            with open(tmp / "features.bin", "wb") as f:
                for idx, feats in batches:
                    if shape is None:
                        shape, dtype = tuple(feats.shape[1:]), str(feats.dtype).removeprefix("mlx.core.")
                        if dtype not in _STORED:
                            raise ValueError(f"cannot cache features of dtype {dtype}")
                    elif tuple(feats.shape[1:]) != shape:
                        raise ValueError(f"feature shape changed from {shape} to {tuple(feats.shape[1:])}")
                    stored = feats.view(mx.uint16) if dtype == "bfloat16" else feats
                    f.write(np.asarray(stored).tobytes())
                    num += feats.shape[0]
                    indices.extend(int(i) for i in idx)
            if shape is None:
                raise VideoError(f"{(info or {}).get('source', key)}: no decodable video frames")
            meta = {"format": FORMAT_VERSION, "num_frames": num, "tokens": shape[0], "dims": shape[1],
                    "dtype": dtype, "indices": indices, **(info or {})}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            final = self.root / key
            try:
                os.replace(tmp, final)
            except OSError:  # another process stored the same entry meanwhile: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        entry = self.lookup(key)
        if entry is None:
            raise OSError(f"{self.root / key}: feature cache entry could not be written")
        return entry
