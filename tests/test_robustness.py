"""Bad input gets a one-line error naming the problem and a distinct exit code; never a traceback or a hang."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_vidllm.cli import main
from tests.bad_inputs import (REAL_CLIP, model_copy, real_clip_head, tokenizer_without, write_audio_only,
                              write_video)

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples/videollava_extreme_ironing.jpg"


@dataclass
class Case:
    name: str
    make: Callable[[Path, Path], list[str]]  # (tmp dir, good model) -> CLI args after "generate"
    exit_code: int
    message: str  # a fragment the one-line message must contain ("" for a successful run)
    warning: str = ""


def video_args(model: Path, video: Path | str, *extra: str) -> list[str]:
    return ["--model", str(model), "--video", str(video), "--prompt", "What happens?", "--max-tokens", "3", *extra]


def _bytes(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def _truncated(tmp: Path) -> Path:
    data = REAL_CLIP.read_bytes()
    return _bytes(tmp, "truncated.mp4", data[: len(data) // 3])


def _no_keyframe(tmp: Path) -> Path:
    """An mkv whose only keyframe is gone: the container is fine, no frame decodes."""
    src = write_video(tmp / "src.mkv", n=4, codec="libx264")
    dst = tmp / "nokey.mkv"
    import av

    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        s = o.add_stream_from_template(i.streams.video[0])
        for packet in i.demux(i.streams.video[0]):
            if packet.dts is None or packet.is_keyframe:
                continue
            packet.stream = s
            o.mux(packet)
    return dst


def _non_utf8(tmp: Path) -> Path:
    src = write_video(tmp / "plain.mp4")
    dst = os.fsdecode(os.fsencode(str(tmp)) + b"/clip_\xff\xfe.mp4")
    os.rename(src, dst)
    return Path(dst)


def _unsupported_family(cfg: dict) -> None:
    cfg["model_type"] = "bert"
    cfg["architectures"] = ["BertModel"]


def _shape_mismatch(cfg: dict) -> None:
    cfg["text_config"]["intermediate_size"] = 96


def _tiny_context(cfg: dict) -> None:
    cfg["text_config"]["max_position_embeddings"] = 100  # 16 frames x 9 tokens do not fit


def _no_image_token(tmp: Path, model: Path) -> Path:
    dst = model_copy(model, tmp / "model_noimage")
    tokenizer_without(dst, "<video>")
    return dst


CASES = [
    # --- video files -------------------------------------------------------------------------------------------
    Case("missing video", lambda t, m: video_args(m, t / "missing.mp4"), 3, "missing.mp4: no such file"),
    Case("directory as video", lambda t, m: video_args(m, t), 3, "is a directory"),
    Case("empty file", lambda t, m: video_args(m, _bytes(t, "empty.mp4", b"")), 3, "file is empty"),
    # the first third of an mp4 with its index up front: what is there decodes, with a warning
    Case("truncated mp4", lambda t, m: video_args(m, _truncated(t)), 0, "", "truncated file?"),
    Case("random bytes .mp4", lambda t, m: video_args(m, _bytes(t, "rand.mp4", random.Random(0).randbytes(4096))),
         3, "not a readable video"),
    Case("text file .mp4", lambda t, m: video_args(m, _bytes(t, "notes.mp4", b"hello\n" * 100)), 3,
         "not a readable video"),
    Case("mp4 header only", lambda t, m: video_args(m, _bytes(t, "head.mp4", REAL_CLIP.read_bytes()[:64])), 3,
         "contains no video stream"),
    Case("audio-only file", lambda t, m: video_args(m, write_audio_only(t / "audio.m4a")), 3,
         "contains no video stream"),
    Case("zero decodable frames", lambda t, m: video_args(m, _no_keyframe(t)), 3, "no decodable video frames"),
    Case("still image as --video", lambda t, m: video_args(m, IMAGE), 0, "", "fewer than the 16 requested"),
    Case("variable frame rate", lambda t, m: video_args(m, write_video(t / "vfr.mkv", n=12,
         pts=[0, 40, 50, 200, 210, 500, 520, 530, 900, 1000, 1400, 1405])), 0, ""),
    Case("rotated phone video", lambda t, m: video_args(m, write_video(t / "rot.mp4", rotation=90)), 0, ""),
    Case("4K frames", lambda t, m: video_args(m, write_video(t / "4k.mp4", n=2, size=(3840, 2160))), 0, ""),
    Case("8K frames", lambda t, m: video_args(m, write_video(t / "8k.mkv", n=2, size=(7680, 4320), codec="mpeg4")),
         0, ""),
    Case("fewer frames than requested", lambda t, m: video_args(m, write_video(t / "short.mp4", n=3)), 0, "",
         "only 3 frames"),
    Case("non-UTF-8 file name", lambda t, m: video_args(m, _non_utf8(t)), 0, ""),
    Case("non-UTF-8 missing file", lambda t, m: video_args(m, os.fsdecode(os.fsencode(str(t)) + b"/x\xff.mp4")),
         3, "no such file"),
    # --- images ----------------------------------------------------------------------------------------------------
    Case("missing image", lambda t, m: ["--model", str(m), "--image", str(t / "no.jpg"), "--prompt", "x"], 3,
         "no.jpg: no such file"),
    Case("random bytes image", lambda t, m: ["--model", str(m), "--image", str(_bytes(t, "x.png", b"\x89PNGxx")),
         "--prompt", "x"], 3, "not a readable image"),
    # --- model folders ---------------------------------------------------------------------------------------------
    Case("missing model folder", lambda t, m: video_args(t / "nomodel", REAL_CLIP), 4, "no such model folder"),
    Case("model path is a file", lambda t, m: video_args(REAL_CLIP, REAL_CLIP), 4, "this is a file"),
    Case("no config.json", lambda t, m: video_args(model_copy(m, t / "m", drop=("config.json",)), REAL_CLIP), 4,
         "config.json is missing"),
    Case("config not JSON", lambda t, m: video_args(_broken_config(t, m), REAL_CLIP), 4, "not valid JSON"),
    Case("unsupported family", lambda t, m: video_args(model_copy(m, t / "m", _unsupported_family), REAL_CLIP), 4,
         "supported families: llava_onevision"),
    Case("no weights", lambda t, m: video_args(model_copy(m, t / "m", drop=("model.safetensors",)), REAL_CLIP), 4,
         "no *.safetensors"),
    Case("corrupt weights", lambda t, m: video_args(_corrupt_weights(t, m), REAL_CLIP), 4,
         "not a readable safetensors file"),
    Case("config/weights shape mismatch", lambda t, m: video_args(model_copy(m, t / "m", _shape_mismatch), REAL_CLIP),
         4, "mlp.gate_proj.weight has shape"),
    Case("tokenizer without <video>", lambda t, m: video_args(_no_image_token(t, m), REAL_CLIP), 4,
         "tokenizer has no <video> token"),
    Case("prompt longer than the context", lambda t, m: video_args(model_copy(m, t / "m", _tiny_context), REAL_CLIP),
         6, "frames would fit"),
    # --- command line ----------------------------------------------------------------------------------------------
    Case("no media", lambda t, m: ["--model", str(m), "--prompt", "x"], 2, "--video"),
    Case("zero frames requested", lambda t, m: video_args(m, REAL_CLIP, "--num-frames", "0"), 2, "num-frames"),
    Case("both --fps and --num-frames", lambda t, m: video_args(m, REAL_CLIP, "--fps", "1", "--num-frames", "4"), 2,
         "alternatives"),
]


def _broken_config(tmp: Path, model: Path) -> Path:
    dst = model_copy(model, tmp / "m")
    (dst / "config.json").write_text("{not json")
    return dst


def _corrupt_weights(tmp: Path, model: Path) -> Path:
    dst = model_copy(model, tmp / "m")
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    return dst


def test_corpus_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, onevision_default, tmp_path):
    import warnings

    args = case.make(tmp_path, onevision_default)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, ["generate", *args])
    out = result.output  # stdout and stderr together
    assert "Traceback" not in out
    assert result.exit_code == case.exit_code, out
    if case.exit_code == 0:
        assert out.strip(), "a successful run prints an answer"
    else:
        errors = [line for line in out.splitlines() if line.startswith(("error:", "Error:"))]
        assert len(errors) == 1, out
        assert case.message in errors[0], out
    if case.warning:
        assert any(case.warning in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_exit_codes_are_documented():
    result = CliRunner().invoke(main, ["--help"])
    text = " ".join(result.output.split())
    assert "Exit codes" in text and "3 unusable video/image" in text and "6 prompt longer than the context" in text


# --------------------------------------------------------------------------------------------- fuzzing the reader

FUZZ_WORKER = r"""
import sys
from mlx_vidllm.media.video import load_video, VideoError
for line in sys.stdin:
    path = line.strip()
    try:
        frames, info, idx = load_video(path, num_frames=4, transform=lambda im: im.resize((32, 32)))
        print("ok", len(frames), flush=True)
    except VideoError as e:
        print("err", str(e).replace("\n", " ")[:200], flush=True)
    except Exception as e:
        print("other", type(e).__name__, str(e).replace("\n", " ")[:200], flush=True)
"""


def _mutations(data: bytes, n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        b = bytearray(data)
        kind = i % 5
        if kind == 0:  # flip bytes anywhere
            for _ in range(rng.randint(1, 20)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # overwrite a range with garbage
            start = rng.randrange(len(b))
            length = rng.randint(1, 512)
            b[start:start + length] = rng.randbytes(min(length, len(b) - start))
        elif kind == 2:  # truncate
            b = b[: rng.randrange(1, len(b))]
        elif kind == 3:  # duplicate a chunk
            start = rng.randrange(len(b))
            b[start:start] = b[start:start + rng.randint(1, 2048)]
        else:  # corrupt the header region (box sizes, codec config)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(min(len(b), 4096))] = rng.randrange(256)
        yield bytes(b)


def test_fuzzed_real_clip_never_crashes_or_hangs(tmp_path):
    """200 byte-level mutations of a real clip: each decodes or raises VideoError; no crash, no hang."""
    clip = real_clip_head(tmp_path / "head.mp4")
    outcomes, failures = {"ok": 0, "err": 0}, []
    worker = None

    def start():
        return subprocess.Popen([sys.executable, "-c", FUZZ_WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, cwd=ROOT)

    import select

    for i, data in enumerate(_mutations(clip.read_bytes(), 200)):
        path = tmp_path / f"m{i}.mp4"
        path.write_bytes(data)
        worker = worker or start()
        worker.stdin.write(f"{path}\n")
        worker.stdin.flush()
        ready, _, _ = select.select([worker.stdout], [], [], 30)  # per-case timeout
        line = worker.stdout.readline() if ready else ""
        if not ready:
            failures.append((i, "hang"))
            worker.kill()
            worker = None
        elif not line:
            failures.append((i, f"crash (exit {worker.wait()})"))
            worker = None
        else:
            kind = line.split()[0]
            if kind == "other":
                failures.append((i, line.strip()))
            else:
                outcomes[kind] += 1
        path.unlink()
    if worker:
        worker.stdin.close()
        worker.wait(timeout=30)
    assert not failures, failures
    assert outcomes["ok"] + outcomes["err"] == 200
    assert outcomes["ok"] > 0 and outcomes["err"] > 0  # the mutations reach both outcomes


# --------------------------------------------------------------------------------------------- long video memory

RSS_WORKER = r"""
import resource, sys
from mlx_vidllm.media.video import load_video
frames, info, idx = load_video(sys.argv[1], fps=1.0, max_frames=32, transform=lambda im: im.resize((384, 384)))
assert len(frames) == 32, len(frames)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, info.duration)
"""


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("long")
    # 2 fps sources: 1 minute = 120 frames, 1 hour = 7,200 frames (small frames keep the test quick)
    return {m: write_video(tmp / f"{m}min.mp4", n=120 * m, size=(160, 120), fps=2) for m in (1, 60)}


def test_hour_long_video_memory_is_flat(long_videos):
    """1 fps sampling over an hour holds no more memory than over a minute (frames are streamed, not kept)."""
    rss = {}
    for minutes, path in long_videos.items():
        out = subprocess.run([sys.executable, "-c", RSS_WORKER, str(path)], capture_output=True, text=True,
                             cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr
        kb, duration = out.stdout.split()
        assert abs(float(duration) - 60 * minutes) < 1
        rss[minutes] = int(kb)
    assert rss[60] <= 1.3 * rss[1], rss


# --------------------------------------------------------------------------------------------- interrupts

def test_ctrl_c_during_generation_keeps_the_text_and_exits_130(onevision_default):
    import signal

    args = [sys.executable, "-m", "mlx_vidllm.cli", "generate", "--model", str(onevision_default), "--image",
            str(IMAGE), "--prompt", "Describe.", "--max-tokens", "3000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    first = proc.stdout.read(1)  # generation has started streaming
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert first
    assert proc.returncode == 130, err
    assert b"interrupted" in err and b"Traceback" not in err


# --------------------------------------------------------------------------------------------- security

class _Evil:
    """Unpickling this would create a file: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(onevision_default, tmp_path):
    import pickle

    victim = tmp_path / "pwned.txt"
    model = model_copy(onevision_default, tmp_path / "evil_model", drop=("model.safetensors",))
    with open(model / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weight": _Evil(str(victim))}, f)
    result = CliRunner().invoke(main, ["generate", *video_args(model, REAL_CLIP)])
    assert result.exit_code == 4, result.output
    assert "pytorch_model.bin: not a readable PyTorch state dict" in result.output
    assert not victim.exists()
    # the converter refuses it the same way and writes nothing
    out = tmp_path / "converted"
    result = CliRunner().invoke(main, ["convert", "--hf-path", str(model), "--mlx-path", str(out)])
    assert result.exit_code != 0 and not out.exists() and not victim.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converted")]


def test_no_remote_code_is_ever_trusted():
    """Nothing in the package passes trust_remote_code=True."""
    for path in (ROOT / "mlx_vidllm").rglob("*.py"):
        assert "trust_remote_code=True" not in path.read_text(), path


def test_checkpoint_index_cannot_point_outside_its_folder(onevision_default, tmp_path):
    """A weight index naming ../ paths reads only files inside the model folder, and a conversion of it
    writes nothing outside --mlx-path."""
    import json as _json

    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not for you")
    model = model_copy(onevision_default, tmp_path / "m" / "model", drop=("model.safetensors",))
    (model / "pytorch_model.bin.index.json").write_text(_json.dumps({"weight_map": {"w": "../../outside.bin"}}))
    result = CliRunner().invoke(main, ["generate", *video_args(model, REAL_CLIP)])
    assert result.exit_code == 4 and "outside.bin: weight file is missing" in result.output, result.output
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, ["convert", "--hf-path", str(model), "--mlx-path", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before and outside.read_bytes() == b"not for you"
