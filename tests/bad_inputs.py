"""Generators for the bad-input corpus (videos written with PyAV, broken files, broken model folders)."""

from __future__ import annotations

import json
import os
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL_CLIP = ROOT / "tests/data/llavanext_xU25MMA2N4aVtYay.mp4"


def write_video(path: Path, n: int = 8, size: tuple[int, int] = (64, 48), fps: int = 8, codec: str = "libx264",
                pts: list[int] | None = None, rotation: int | None = None) -> Path:
    """Frame i is a gradient shifted by i. `pts` (in 1/1000 s) makes a variable-frame-rate stream."""
    w, h = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if pts is not None:
            stream.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        for i in range(n):
            img = np.broadcast_to((x + 16 * i) % 256, (h, w, 3)).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = np.zeros((1, 16000), np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def real_clip_head(path: Path, packets: int = 24) -> Path:
    """The first packets of the real clip, stream-copied: real content, quick to decode."""
    with av.open(str(REAL_CLIP)) as src, av.open(str(path), "w") as dst:
        s_in = src.streams.video[0]
        s_out = dst.add_stream_from_template(s_in)
        for i, packet in enumerate(src.demux(s_in)):
            if packet.dts is None or i >= packets:
                break
            packet.stream = s_out
            dst.mux(packet)
    return path


def model_copy(src: Path, dst: Path, edit_config=None, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        os.remove(dst / name)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def tokenizer_without(dst: Path, token: str) -> None:
    """Remove an added token from tokenizer.json/tokenizer_config.json."""
    tj = json.loads((dst / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != token]
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    for key in ("added_tokens_decoder",):
        if key in tc:
            tc[key] = {k: v for k, v in tc[key].items() if v.get("content") != token}
    tc.pop("extra_special_tokens", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
