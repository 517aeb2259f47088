"""Chat sessions: follow-up questions reuse the encoded video and the KV cache, with identical results."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np

from mlx_vidllm import load, stream_generate
from mlx_vidllm.chat import ChatSession

VIDEO = "examples/videollava_sample_demo_1.mp4"


def tokens(responses) -> list[int]:
    return [r.token for r in responses]


def test_follow_up_equals_recomputing_the_whole_conversation(onevision_default):
    model, processor = load(onevision_default, dtype="float32")
    session = ChatSession(model, processor, video=VIDEO, num_frames=4)
    first = list(session.ask("What happens?", max_tokens=8))
    second = list(session.ask("And then?", max_tokens=8))
    frames = processor.load_video(VIDEO, num_frames=4)
    text = processor.format_prompt("And then?", num_videos=1, history=[("What happens?", "".join(r.text for r in first))])
    expected = tokens(stream_generate(model, processor, text, video=frames, chat_template=False, max_tokens=8))
    assert tokens(second) == expected
    assert second[-1].prompt_tokens > first[-1].prompt_tokens


def test_second_question_skips_decoding_and_the_vision_encoder(onevision_default, monkeypatch):
    model, processor = load(onevision_default, dtype="float32")
    calls = {"vision": 0, "decode": 0}
    encode, load_video = model.encode_frames, processor.load_video

    def counting_encode(*a, **k):
        calls["vision"] += 1
        return encode(*a, **k)

    def counting_load(*a, **k):
        calls["decode"] += 1
        return load_video(*a, **k)

    monkeypatch.setattr(model, "encode_frames", counting_encode)
    monkeypatch.setattr(processor, "load_video", counting_load)
    session = ChatSession(model, processor, video=VIDEO, num_frames=4)
    list(session.ask("What happens?", max_tokens=4))
    assert calls == {"vision": 1, "decode": 1}
    list(session.ask("Who is there?", max_tokens=4))
    # a new conversation about the same file: the media and the prefix KV come from the cache
    fresh = ChatSession(model, processor, video=VIDEO, num_frames=4)
    answer = tokens(fresh.ask("Describe it.", max_tokens=6))
    assert calls == {"vision": 1, "decode": 1}
    assert answer == tokens(stream_generate(model, processor, "Describe it.", video=VIDEO, num_frames=4,
                                            max_tokens=6))


def test_changed_file_is_never_served_from_the_cache(onevision_default, tmp_path):
    model, processor = load(onevision_default, dtype="float32")
    clip = tmp_path / "clip.mp4"
    shutil.copy(VIDEO, clip)
    a = tokens(ChatSession(model, processor, video=clip, num_frames=4).ask("What?", max_tokens=6))
    shutil.copy("tests/data/videollava_sample_demo_3.mp4", clip)  # same path, new content
    b = tokens(ChatSession(model, processor, video=clip, num_frames=4).ask("What?", max_tokens=6))
    expected = tokens(stream_generate(model, processor, "What?", video=str(clip), num_frames=4, max_tokens=6))
    assert b == expected and a != b


def test_cli_chat_answers_each_line(onevision_default):
    proc = subprocess.run([sys.executable, "-m", "mlx_vidllm.cli", "chat", "--model", str(onevision_default),
                           "--video", VIDEO, "--num-frames", "4", "--max-tokens", "5", "--verbose"],
                          input="What happens?\nAnd then?\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("time to first token") == 2
    ttft = [float(line.split("time to first token: ")[1].split(" s")[0])
            for line in proc.stderr.splitlines() if "time to first token" in line]
    assert ttft[1] < ttft[0]
    assert len(proc.stdout.strip().splitlines()) >= 2 or proc.stdout.count("\n") >= 2


def test_cache_never_serves_another_models_features(onevision_default, onevision_tied):
    """The cache key holds id(model); a later model that happens to reuse the id must not get the old entry."""
    import gc

    from mlx_vidllm import chat

    model, processor = load(onevision_default, dtype="float32")
    list(ChatSession(model, processor, video=VIDEO, num_frames=4).ask("What?", max_tokens=2))
    key = next(reversed(chat._ENTRIES))
    del model
    gc.collect()
    other, other_processor = load(onevision_tied, dtype="float32")
    entry = chat._ENTRIES[key]
    entry_model = entry.model()
    assert entry_model is None or entry_model is not other
    session = ChatSession(other, other_processor, video=VIDEO, num_frames=4)
    if session._key == key:  # the id was reused: the stale entry must have been dropped
        assert session._entry is None
    answer = tokens(session.ask("What?", max_tokens=4))
    assert answer == tokens(stream_generate(other, other_processor, "What?", video=VIDEO, num_frames=4, max_tokens=4))
