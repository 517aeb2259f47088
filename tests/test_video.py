"""Tests for mlx_vidllm.media.video: sampling rules, PyAV decoding, probing and error messages.

Real clips live in tests/data and examples/; synthetic clips are written with PyAV into tmp dirs, with
frame i painted a solid gray level of 8*i so a decoded frame can be traced back to its source index.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from mlx_vidllm.media import video
from mlx_vidllm.media.video import (
    VideoError,
    VideoInfo,
    arange_indices,
    fps_indices,
    is_video_file,
    load_video,
    probe_video,
    read_frames,
    uniform_indices,
)

ROOT = Path(__file__).resolve().parents[1]
REAL_CLIPS = [
    ROOT / "tests/data/llavanext_xU25MMA2N4aVtYay.mp4",
    ROOT / "tests/data/videollava_sample_demo_3.mp4",
    ROOT / "examples/videollava_sample_demo_1.mp4",
]
N_SYNTH = 30  # gray levels 0..232 stay inside uint8


# ----------------------------------------------------------------------------- helpers


@lru_cache(maxsize=None)
def reference_decode(path: Path) -> tuple[int, list[str]]:
    """Independent full decode (no threading, to_ndarray): frame count and a hash per frame."""
    with av.open(str(path)) as c:
        hashes = [_hash(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    return len(hashes), hashes


def reference_frame(path: Path, index: int) -> np.ndarray:
    with av.open(str(path)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i == index:
                return f.to_ndarray(format="rgb24")
    raise IndexError(index)


def _hash(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def write_video(path: Path, codec: str, n: int = N_SYNTH, size=(64, 48), rotation: int | None = None, frame_fn=None):
    """Write n frames; by default frame i is solid gray 8*i."""
    w, h = size
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i in range(n):
            rgb = frame_fn(i) if frame_fn else np.full((h, w, 3), 8 * i, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def gray_levels(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(len(frames), -1).mean(axis=1)


def assert_source_frames(frames: np.ndarray, indices) -> None:
    """Lossy-codec tolerant check that frames[k] is synthetic source frame indices[k]."""
    np.testing.assert_allclose(gray_levels(frames), 8 * np.asarray(indices), atol=10)


def first_encoder(*names: str) -> str | None:
    return next((n for n in names if n in av.codecs_available), None)


@pytest.fixture(scope="module")
def synth_mp4(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("v") / "gray.mp4", first_encoder("libx264", "h264", "mpeg4"))


@pytest.fixture(scope="module")
def synth_webm(tmp_path_factory) -> Path:
    codec = first_encoder("libvpx-vp9", "libvpx", "vp9", "vp8")
    if codec is None:
        pytest.skip("this PyAV build has no VP8/VP9 encoder")
    return write_video(tmp_path_factory.mktemp("v") / "gray.webm", codec)


# ----------------------------------------------------------------------------- sampling rules


def test_uniform_and_arange_rules():
    assert uniform_indices(243, 8).tolist() == [0, 34, 69, 103, 138, 172, 207, 242]
    assert arange_indices(243, 8).tolist() == [0, 30, 60, 91, 121, 151, 182, 212]
    for total in range(1, 200):
        for n in (1, 8, 16, 32):
            if total >= n:
                assert np.array_equal(uniform_indices(total, n), np.linspace(0, total - 1, n).astype(int))
                assert np.array_equal(arange_indices(total, n), np.arange(0, total, total / n).astype(int)[:n])
                assert len(arange_indices(total, n)) == n
    assert uniform_indices(5, 16).tolist() == arange_indices(5, 16).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        uniform_indices(10, 0)


def test_fps_rule():
    assert fps_indices(100, 30.0, 1.0).tolist() == [0, 30, 60, 90]
    assert fps_indices(10, 25.0, 10.0).tolist() == [0, 2, 4, 6, 8]  # round(2.5) == 2 (Python rounding)
    assert fps_indices(5, 10.0, 30.0).tolist() == [0, 1, 2, 3, 4]  # stride never below 1
    cand = np.arange(0, 1000, 30)
    capped = fps_indices(1000, 30.0, 1.0, max_frames=8)
    assert np.array_equal(capped, cand[np.linspace(0, len(cand) - 1, 8).astype(int)])
    assert len(fps_indices(100, 30.0, 1.0, max_frames=64)) == 4  # cap only when exceeded
    with pytest.raises(ValueError):
        fps_indices(100, 0.0, 1.0)


# ----------------------------------------------------------------------------- real clips


@pytest.mark.parametrize("path", REAL_CLIPS, ids=lambda p: p.name)
def test_probe_real_clip(path):
    n, _ = reference_decode(path)
    info = probe_video(path)
    assert isinstance(info, VideoInfo) and info.path == str(path)
    assert info.num_frames == n
    assert 20 < info.avg_fps < 31
    assert info.duration == pytest.approx(n / info.avg_fps)
    first = reference_frame(path, 0)
    assert (info.height, info.width) == first.shape[:2]
    assert info.rotation == 0
    assert is_video_file(path)


@pytest.mark.parametrize("path", REAL_CLIPS, ids=lambda p: p.name)
@pytest.mark.parametrize("num_frames", [16, 8])
def test_uniform_sampling_real_clip(path, num_frames):
    n, hashes = reference_decode(path)
    frames, info, idx = load_video(path, num_frames=num_frames)
    assert np.array_equal(idx, np.linspace(0, n - 1, num_frames).astype(int))
    assert frames.dtype == np.uint8 and frames.shape == (num_frames, info.height, info.width, 3)
    # every returned frame is exactly the source frame at its index, in the requested order
    assert [_hash(f) for f in frames] == [hashes[i] for i in idx]


def test_frame_at_index_matches_full_decode():
    path = REAL_CLIPS[1]
    n, _ = reference_decode(path)
    for k in (0, n // 3, n - 1):
        got = read_frames(path, [k])
        assert got.shape[0] == 1 and np.array_equal(got[0], reference_frame(path, k))


@pytest.mark.parametrize("path", REAL_CLIPS[1:], ids=lambda p: p.name)
def test_arange_sampling_real_clip(path):
    n, hashes = reference_decode(path)
    frames, _, idx = load_video(path, num_frames=8, rule="arange")
    assert np.array_equal(idx, np.arange(0, n, n / 8).astype(int))
    assert [_hash(f) for f in frames] == [hashes[i] for i in idx]


def test_fps_sampling_real_clip():
    path = ROOT / "examples/videollava_sample_demo_1.mp4"  # 243 frames at 25 fps
    n, hashes = reference_decode(path)
    frames, info, idx = load_video(path, fps=1.0)
    assert idx.tolist() == list(range(0, n, 25)) and len(frames) == 10
    assert [_hash(f) for f in frames] == [hashes[i] for i in idx]
    frames, _, idx = load_video(path, fps=1.0, max_frames=4, num_frames=99)  # fps wins over num_frames
    assert idx.tolist() == [0, 75, 150, 225] and len(frames) == 4


def test_transform_on_real_clip():
    seen = []

    def resize(im: Image.Image) -> Image.Image:
        seen.append(im.size)
        return im.resize((56, 32))

    frames, info, idx = load_video(REAL_CLIPS[0], num_frames=4, transform=resize)
    assert frames.shape == (4, 32, 56, 3)
    assert seen == [(info.width, info.height)] * 4  # called once per frame, on the full-size decode


# ----------------------------------------------------------------------------- synthetic clips


def test_synthetic_mp4_frames_are_the_right_ones(synth_mp4):
    info = probe_video(synth_mp4)
    assert (info.num_frames, info.avg_fps, info.width, info.height) == (N_SYNTH, 10.0, 64, 48)
    frames, _, idx = load_video(synth_mp4, num_frames=8)
    assert np.array_equal(idx, np.linspace(0, N_SYNTH - 1, 8).astype(int))
    assert_source_frames(frames, idx)
    frames, _, idx = load_video(synth_mp4, num_frames=7, rule="arange")
    assert_source_frames(frames, idx)


def test_webm_without_frame_count(synth_webm):
    with av.open(str(synth_webm)) as c:
        assert not c.streams.video[0].frames  # the container really does not report a count
    info = probe_video(synth_webm)
    assert info.num_frames == N_SYNTH and info.avg_fps == 10.0 and info.duration == pytest.approx(3.0)
    frames, _, idx = load_video(synth_webm, num_frames=16)
    assert np.array_equal(idx, np.linspace(0, N_SYNTH - 1, 16).astype(int))
    assert_source_frames(frames, idx)
    frames, _, idx = load_video(synth_webm, fps=2.0)  # stride 5
    assert idx.tolist() == [0, 5, 10, 15, 20, 25]
    assert_source_frames(frames, idx)


@pytest.mark.parametrize("rule", ["uniform", "arange"])
def test_short_video_uses_all_frames_and_warns(tmp_path, rule):
    path = write_video(tmp_path / "short.mp4", first_encoder("libx264", "h264", "mpeg4"), n=5)
    with pytest.warns(UserWarning, match="fewer than the 16 requested"):
        frames, info, idx = load_video(path, num_frames=16, rule=rule)
    assert idx.tolist() == [0, 1, 2, 3, 4] and len(frames) == 5
    assert_source_frames(frames, idx)


def test_transform_applied_during_decode(synth_webm):
    calls = []

    def to_small(im: Image.Image) -> Image.Image:
        calls.append(im.size)
        return im.resize((40, 24))

    frames = read_frames(synth_webm, [2, 9, 20], transform=to_small)
    assert frames.shape == (3, 24, 40, 3) and frames.dtype == np.uint8
    assert calls == [(64, 48)] * 3
    assert_source_frames(frames, [2, 9, 20])


def test_duplicate_and_unordered_indices(synth_mp4):
    idx = [3, 1, 3, 0, 29, 1]
    frames = read_frames(synth_mp4, idx)
    assert frames.shape == (6, 48, 64, 3)
    assert_source_frames(frames, idx)
    assert np.array_equal(frames[0], frames[2]) and np.array_equal(frames[1], frames[5])


def test_indices_past_end_are_dropped(synth_mp4):
    frames = read_frames(synth_mp4, [28, 29, 30, 45])
    assert len(frames) == 2
    assert_source_frames(frames, [28, 29])
    with pytest.raises(ValueError):
        read_frames(synth_mp4, [-1])


def test_over_reported_frame_count_is_resampled(synth_mp4, monkeypatch):
    real = video.probe_video

    def over_reporting(path):
        info = real(path)
        info.num_frames += 20  # as if the container claimed 50 frames
        return info

    monkeypatch.setattr(video, "probe_video", over_reporting)
    frames, info, idx = load_video(synth_mp4, num_frames=8)
    assert info.num_frames == N_SYNTH
    assert np.array_equal(idx, np.linspace(0, N_SYNTH - 1, 8).astype(int))
    assert_source_frames(frames, idx)


# ----------------------------------------------------------------------------- rotation


@pytest.mark.skipif(
    not hasattr(av.video.stream.VideoStream, "set_display_rotation"), reason="PyAV cannot write display matrices"
)
@pytest.mark.parametrize("ccw", [90, -90, 180])
def test_rotation_metadata_is_honoured(tmp_path, ccw):
    def marked(i):  # bright block in the top-left corner of a 64x48 frame
        a = np.zeros((48, 64, 3), np.uint8)
        a[:24, :32] = 255
        return a

    path = write_video(tmp_path / "rot.mp4", first_encoder("libx264", "h264", "mpeg4"), n=3, rotation=ccw,
                       frame_fn=marked)
    info = probe_video(path)
    assert info.rotation == (-ccw) % 360  # clockwise, like the legacy 'rotate' tag (phones write 90)
    upright = np.rot90(marked(0), k=ccw // 90)  # np.rot90 turns counter-clockwise for k > 0
    assert (info.height, info.width) == upright.shape[:2]
    frames, _, _ = load_video(path, num_frames=2)
    assert frames.shape[1:] == upright.shape
    assert np.abs(frames[0].astype(int) - upright).mean() < 10


# ----------------------------------------------------------------------------- errors


def _audio_only(path: Path) -> Path:
    codec = first_encoder("aac", "mp2", "libopus", "flac")
    if codec is None:
        pytest.skip("no audio encoder in this PyAV build")
    with av.open(str(path), "w", format="matroska") as c:
        s = c.add_stream(codec, rate=48000)
        s.layout = "mono"
        fmt = s.codec_context.codec.audio_formats[0].name
        for _ in range(5):
            frame = av.AudioFrame(format=fmt, layout="mono", samples=s.codec_context.frame_size or 1152)
            for p in frame.planes:
                p.update(bytes(p.buffer_size))
            frame.sample_rate = 48000
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _keyframes_dropped(path: Path) -> Path:
    """An mkv whose video stream has packets but none the decoder can output (the keyframe is gone)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(first_encoder("libx264", "h264"), rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        packets = []
        for i in range(10):
            packets += s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 8 * i, np.uint8), format="rgb24"))
        packets += s.encode()
        for p in packets:
            if not p.is_keyframe:
                c.mux(p)
    return path


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_FILES = {
    "missing": (lambda d: d / "nope.mp4", "no such file"),
    "directory": (lambda d: d, "is a directory, expected a video file"),
    "empty": (lambda d: _file(d / "empty.mp4", b""), "file is empty"),
    "random_bytes": (lambda d: _file(d / "junk.mp4", np.random.default_rng(0).bytes(4096)), "not a readable video ("),
    "audio_only": (lambda d: _audio_only(d / "audio.mka"), "contains no video stream"),
    "no_decodable_frames": (lambda d: _keyframes_dropped(d / "nokey.mkv"), "no decodable video frames"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_raise_video_error(tmp_path, case):
    make, phrase = BAD_FILES[case]
    path = make(tmp_path)
    calls = [probe_video, load_video]
    if case != "no_decodable_frames":  # read_frames returns what it decoded (nothing) instead of raising
        calls.append(lambda p: read_frames(p, [0]))
    for call in calls:
        with pytest.raises(VideoError) as err:
            call(path)
        msg = str(err.value)
        assert msg.startswith(str(path)) and phrase in msg and "\n" not in msg
    assert isinstance(err.value, ValueError)
    assert is_video_file(path) is (case == "no_decodable_frames")  # cheap check: stream exists, no decode


def test_read_frames_with_nothing_decodable_returns_empty(tmp_path):
    assert read_frames(_keyframes_dropped(tmp_path / "nokey.mkv"), [0, 1]).shape[0] == 0


def test_bad_rule():
    with pytest.raises(ValueError, match="rule"):
        load_video(REAL_CLIPS[0], rule="random")


# ----------------------------------------------------------------------------- seeking decode

@pytest.mark.parametrize("path", REAL_CLIPS)
def test_seeking_decode_equals_sequential_decode(path):
    """Sparse sampling seeks to keyframes; the frames must be exactly those of a full decode."""
    from mlx_vidllm.media.video import _read

    n = probe_video(path).num_frames
    for indices in (uniform_indices(n, 4), uniform_indices(n, 16), np.array([n - 1, 0, n // 2, n // 2])):
        seq, _ = _read(path, indices, None, seek=False)
        sought, total = _read(path, indices, None, seek=True)
        assert np.array_equal(seq, sought)
    assert total == n
