"""Video decoding (PyAV) and the frame-sampling rules used by the supported video LLMs.

Frame indices always refer to the decode-order position of a frame in the first video stream
(0 = first frame the decoder outputs), which is what decord / the reference implementations use.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import av
import numpy as np
from PIL import Image

from ..errors import InputError

Transform = Callable[[Image.Image], Image.Image]

# Everything PyAV / FFmpeg may raise while opening, demuxing or decoding a file.
_AV_ERRORS = (av.FFmpegError, OSError, EOFError, RuntimeError, UnicodeDecodeError)
# Counter-clockwise rotation -> PIL transpose that makes the frame display upright.
_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


class VideoError(InputError):
    """A file that cannot be used as a video; the message names the file and the problem."""


@dataclass
class VideoInfo:
    path: str
    num_frames: int  # frames in the stream (container count, else counted by demuxing packets)
    avg_fps: float  # 0.0 when no rate can be determined at all
    duration: float  # seconds = num_frames / avg_fps
    width: int  # display size, i.e. after applying `rotation`
    height: int
    rotation: int  # clockwise degrees needed to display upright (0/90/180/270), like the legacy 'rotate' tag


# ----------------------------------------------------------------------------- sampling rules


def uniform_indices(total: int, num_frames: int) -> np.ndarray:
    """LLaVA-OneVision / LLaVA-Video rule: linspace over [0, total-1]; all frames if the video is shorter."""
    _check_counts(total, num_frames)
    if total < num_frames:
        return np.arange(total)
    return np.linspace(0, total - 1, num_frames).astype(int)


def arange_indices(total: int, num_frames: int) -> np.ndarray:
    """Video-LLaVA (-hf) rule: arange(0, total, total/num_frames); all frames if the video is shorter."""
    _check_counts(total, num_frames)
    if total < num_frames:
        return np.arange(total)
    # [:num_frames] only guards against float rounding in the step adding one extra index.
    return np.arange(0, total, total / num_frames).astype(int)[:num_frames]


def fps_indices(total: int, avg_fps: float, fps: float, max_frames: int | None = None) -> np.ndarray:
    """LLaVA-Video style: every round(avg_fps/fps)-th frame, thinned uniformly to at most max_frames."""
    if avg_fps <= 0 or fps <= 0:
        raise ValueError(f"fps_indices needs positive rates, got avg_fps={avg_fps}, fps={fps}")
    stride = max(1, round(avg_fps / fps))  # Python round (banker's), as in the reference code
    candidates = np.arange(0, max(total, 0), stride)
    if max_frames is not None and len(candidates) > max_frames:
        candidates = candidates[np.linspace(0, len(candidates) - 1, max_frames).astype(int)]
    return candidates


def _check_counts(total: int, num_frames: int) -> None:
    if num_frames < 1 or total < 0:
        raise ValueError(f"need num_frames >= 1 and total >= 0, got num_frames={num_frames}, total={total}")


# ----------------------------------------------------------------------------- opening / probing


def _open(path: str | os.PathLike) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Open `path` and pick its video stream, turning every failure into a one-line VideoError."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise VideoError(f"{p}: no such file")
    if os.path.isdir(p):
        raise VideoError(f"{p}: is a directory, expected a video file")
    if os.path.getsize(p) == 0:
        raise VideoError(f"{p}: file is empty")
    try:
        container = av.open(p)
    except _AV_ERRORS as e:
        raise VideoError(f"{p}: not a readable video ({_reason(e)})") from e
    # Cover art in audio files shows up as a one-picture "video" stream: it is not a video.
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        container.close()
        raise VideoError(f"{p}: contains no video stream")
    streams[0].codec_context.thread_type = "AUTO"
    return container, streams[0]


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _decoded(container, stream, path: str) -> Iterator[av.VideoFrame]:
    """container.decode(stream), with av errors raised as VideoError (but not errors of the consumer)."""
    frames = container.decode(stream)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except _AV_ERRORS as e:
            raise VideoError(f"{path}: not a readable video ({_reason(e)})") from e
        yield frame


def _ccw_rotation(frame: av.VideoFrame, stream) -> int:
    """Counter-clockwise degrees to rotate `frame` for upright display (0 when unknown)."""
    rot = getattr(frame, "rotation", None)  # display-matrix side data, PyAV >= 13
    if rot is None:  # older PyAV: legacy 'rotate' tag, which is clockwise
        try:
            rot = -int(stream.metadata.get("rotate", 0))
        except ValueError:
            rot = 0
    return int(round(rot)) % 360


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, rate and display size; decodes only the first frame (to check it decodes at all)."""
    p = os.fspath(path)
    container, stream = _open(p)
    with container:
        reported = stream.frames or 0  # mp4 fills this in; webm/mkv usually report 0
        packets, first = 0, None
        try:
            for packet in container.demux(stream):
                if packet.size:  # demux ends with an empty packet, which flushes the decoder
                    packets += 1
                if first is None:
                    first = next(iter(packet.decode()), None)
                if first is not None and reported > 0:
                    break
        except _AV_ERRORS as e:
            raise VideoError(f"{p}: not a readable video ({_reason(e)})") from e
        if first is None:
            raise VideoError(f"{p}: no decodable video frames")
        rotation = (-_ccw_rotation(first, stream)) % 360
        fps = _avg_fps(container, stream, reported or packets)
    num_frames = reported or packets or _count_by_decoding(p)
    width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
    return VideoInfo(p, num_frames, fps, num_frames / fps if fps else 0.0, width, height, rotation)


def _avg_fps(container, stream, num_frames: int) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    else:
        seconds = (container.duration or 0) / av.time_base
    return num_frames / seconds if seconds > 0 else 0.0


def _count_by_decoding(path: str) -> int:
    container, stream = _open(path)
    with container:
        return sum(1 for _ in _decoded(container, stream, path))


def is_video_file(path: str | os.PathLike) -> bool:
    """Cheap check (header only, no decoding): does `path` open and contain a video stream?"""
    try:
        container, _ = _open(path)
    except VideoError:
        return False
    container.close()
    return True


# ----------------------------------------------------------------------------- decoding


def _to_array(frame: av.VideoFrame, stream, transform: Transform | None) -> np.ndarray:
    img = frame.to_image()
    ccw = _ccw_rotation(frame, stream)
    if ccw in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[ccw])
    if transform is not None:  # right away, so we never hold full-resolution frames
        img = transform(img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


# Wanted frames further apart than this (on average) are reached by seeking instead of decoding
# everything in between: 16 frames of an hour-long video decode in seconds, not minutes.
SEEK_MIN_GAP = 48


def _frame_table(container, stream) -> tuple[list[int], list[int]] | None:
    """Presentation timestamps of every frame, in display order, and those of keyframes.
    Demuxing only (no decoding). None when packets carry no timestamps."""
    pts, keys = [], []
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        if packet.pts is None:
            return None
        pts.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
    pts.sort()
    return pts, sorted(keys)


def _read_seeking(path: str, wanted: set[int], transform) -> tuple[dict[int, np.ndarray], int] | None:
    """Decode only around the wanted frames: seek to the keyframe before each, decode up to it.
    Frames are identified by their timestamp's rank, which is their decode-order index.
    Returns (frames by index, frames in the stream), or None when timestamps cannot identify
    frames reliably here, and the caller decodes sequentially instead."""
    container, stream = _open(path)
    with container:
        table = _frame_table(container, stream)
        if table is None or len(set(table[0])) != len(table[0]) or not table[1]:
            return None
        pts, keys = table
        rank = {t: i for i, t in enumerate(pts)}
        kept: dict[int, np.ndarray] = {}
        todo = sorted(i for i in wanted if i < len(pts))
        j = 0
        while j < len(todo):
            target = pts[todo[j]]
            key = max((k for k in keys if k <= target), default=keys[0])
            container.seek(key, stream=stream, backward=True, any_frame=False)
            for frame in _decoded(container, stream, path):
                i = rank.get(frame.pts, -1) if frame.pts is not None else -1
                if i < 0 or i > todo[j]:
                    return None  # the wanted frame never came out: timestamps do not identify frames
                if i == todo[j]:
                    kept[i] = _to_array(frame, stream, transform)
                    j += 1
                    # the next wanted frame is close: keep decoding instead of seeking again
                    if j == len(todo) or todo[j] - i > SEEK_MIN_GAP:
                        break
            else:
                return None
        return kept, len(pts)


def _read(path: str | os.PathLike, indices: Sequence[int], transform: Transform | None,
          seek: bool | None = None) -> tuple[np.ndarray, int]:
    """read_frames plus the number of frames in the stream as far as decoding saw it.
    `seek`: None decides by the spacing of the indices; True/False force a path (tests)."""
    p = os.fspath(path)
    wanted = {int(i) for i in indices}
    if any(i < 0 for i in wanted):
        raise ValueError(f"frame indices must be >= 0, got {min(wanted)}")
    sought = None
    if wanted and (seek or (seek is None and max(wanted) / len(wanted) > SEEK_MIN_GAP)):
        try:
            sought = _read_seeking(p, wanted, transform)
        except _AV_ERRORS:
            sought = None
    if sought is not None:
        kept, n = sought
    else:
        kept, n = {}, 0
        container, stream = _open(p)
        with container:
            if wanted:
                last = max(wanted)
                for n, frame in enumerate(_decoded(container, stream, p), start=1):
                    i = n - 1
                    if i in wanted:
                        kept[i] = _to_array(frame, stream, transform)
                    if i >= last:
                        break
    out = [kept[int(i)] for i in indices if int(i) in kept]
    return (np.stack(out) if out else np.zeros((0, 0, 0, 3), np.uint8)), n


def read_frames(
    path: str | os.PathLike, indices: Sequence[int], transform: Transform | None = None
) -> np.ndarray:
    """Decode `indices` (decode-order, duplicates allowed) as uint8 (T,H,W,3) RGB in the order given.

    Frames are rotated upright per the display-matrix metadata, then `transform`ed. Indices past the
    real end of the stream (containers can over-report the frame count) are silently dropped, so the
    result can be shorter than `indices`; load_video detects that and re-samples from the true count.
    """
    return _read(path, indices, transform)[0]


def load_video(
    path: str | os.PathLike,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    rule: str = "uniform",
    transform: Transform | None = None,
) -> tuple[np.ndarray, VideoInfo, np.ndarray]:
    """Sample and decode frames: by `fps` (capped by `max_frames`) if given, else `num_frames` (default 16)
    with `rule` "uniform" or "arange". Returns (frames uint8 (T,H,W,3), info, indices used)."""
    if rule not in ("uniform", "arange"):
        raise ValueError(f"unknown sampling rule {rule!r}, expected 'uniform' or 'arange'")
    info = probe_video(path)
    if fps is None:
        num_frames = 16 if num_frames is None else num_frames
    elif info.avg_fps <= 0:
        raise VideoError(f"{info.path}: frame rate unknown, sample with num_frames instead of fps")

    def pick(total: int) -> np.ndarray:
        if fps is not None:
            return fps_indices(total, info.avg_fps, fps, max_frames)
        return (uniform_indices if rule == "uniform" else arange_indices)(total, num_frames)

    indices = pick(info.num_frames)
    frames, decoded = _read(path, indices, transform)
    if len(frames) < len(indices):  # the stream ended early: re-sample from the frames that really exist
        if decoded == 0:
            raise VideoError(f"{info.path}: no decodable video frames")
        warnings.warn(f"{info.path}: the stream ends after {decoded} of the {info.num_frames} frames its header "
                      f"announces (truncated file?); sampling from those", stacklevel=2)
        info = replace(info, num_frames=decoded, duration=decoded / info.avg_fps if info.avg_fps else 0.0)
        indices = pick(decoded)
        frames, _ = _read(path, indices, transform)
    if fps is None and info.num_frames < num_frames:
        warnings.warn(
            f"{info.path}: video has only {info.num_frames} frames, fewer than the {num_frames} requested; using all",
            stacklevel=2,
        )
    return frames, info, indices
