"""One benchmark measurement in a fresh process (run.py starts one per system, config and round).

    python benchmarks/worker.py --system mlx-vidllm|mlx-vlm|transformers --model DIR --dtype float32|4bit|...
                                --frames 8 --video clip.mp4
    python benchmarks/worker.py --probe          # MLX float32 matmul rate and memory read bandwidth

Loads the model (timed on its own), then asks one question about the video and generates exactly
TOKENS tokens greedily, EOS ignored. Prints one line `RESULT {json}` on stdout with, in seconds:

    media_s    frame decoding + preprocessing + prompt tokenization
    vision_s   vision tower + projector + pooling + merge into the prompt embeddings (evaluated)
    prefill_s  decoder prefill up to the first sampled token
    ttft_s     media_s + vision_s + prefill_s (one clock, from the start of the question)
    decode_tps (TOKENS - 1) / time from the first to the last token

and peak_rss_gb (getrusage maximum, whole process, taken right after the first answer), rss_load_gb
(resident after loading), mlx_peak_gb (mx.get_peak_memory, reset after loading). mlx-vidllm also times a
second question on the same video (second_stream_ttft_s, chat_*_ttft_s; peak_rss_all_gb after those).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time

QUESTION = "What is happening in this video? Describe it in detail."
SECOND = "What colors are the main objects in the video?"
TOKENS = 64
now = time.perf_counter


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e9


def stages(t0: float, t_media: float, t_vision: float, token_times: list[float], prompt_tokens: int) -> dict:
    first, last = token_times[0], token_times[-1]
    return {"media_s": t_media - t0, "vision_s": t_vision - t_media, "prefill_s": first - t_vision,
            "ttft_s": first - t0, "decode_tps": (len(token_times) - 1) / (last - first),
            "gen_tokens": len(token_times), "prompt_tokens": int(prompt_tokens), "peak_rss_gb": peak_rss_gb()}


def last(generator):
    item = None
    for item in generator:
        pass
    return item


# --- the three systems -------------------------------------------------------------------------------------


def run_mlx_vidllm(args) -> dict:
    import mlx_vidllm  # first: preloads OpenBLAS for MLX
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_vidllm import stream_generate

    start = now()
    model, processor = mlx_vidllm.load(args.model, dtype=None if args.dtype == "4bit" else args.dtype)
    out = {"load_s": now() - start, "rss_load_gb": rss_gb()}
    mx.reset_peak_memory()

    # The first question: stream_generate's own steps, with generate_step so that EOS does not stop it.
    t0 = now()
    frames = processor.load_video(args.video, num_frames=args.frames)
    inputs = processor(processor.format_prompt(QUESTION, num_videos=1), videos=[frames])
    ids = inputs["input_ids"][0]
    t_media = now()
    embeds = model.get_input_embeddings(**inputs)
    mx.eval(embeds)
    t_vision = now()
    times = [now() for _ in generate_step(mx.array(ids), model.language_model, max_tokens=TOKENS,
                                          sampler=lambda logprobs: mx.argmax(logprobs, axis=-1),
                                          input_embeddings=embeds)]
    out.update(stages(t0, t_media, t_vision, times, len(ids)), mlx_peak_gb=mx.get_peak_memory() / 1e9)

    # A second question on the same video: the public API again (no cache there), then ChatSession if present.
    if "stream" in args.second:
        r = last(stream_generate(model, processor, SECOND, video=args.video, num_frames=args.frames, max_tokens=1))
        out["second_stream_ttft_s"] = r.time_to_first_token
    try:
        from mlx_vidllm.chat import ChatSession
    except ImportError:
        ChatSession = None
    if ChatSession is not None and "chat" in args.second:
        session = ChatSession(model, processor, video=args.video, num_frames=args.frames)
        out["chat_first_ttft_s"] = last(session.ask(QUESTION, max_tokens=TOKENS)).time_to_first_token
        out["chat_follow_up_ttft_s"] = last(session.ask(SECOND, max_tokens=1)).time_to_first_token
        fresh = ChatSession(model, processor, video=args.video, num_frames=args.frames)
        out["chat_new_session_ttft_s"] = last(fresh.ask(SECOND, max_tokens=1)).time_to_first_token
    out["peak_rss_all_gb"] = peak_rss_gb()
    return out


def run_mlx_vlm(args) -> dict:
    import mlx_vidllm  # noqa: F401 - the same OpenBLAS preload for both MLX systems
    import mlx.core as mx
    from mlx_vlm import load
    from mlx_vlm.generate import generate_step
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import prepare_inputs

    start = now()
    model, processor = load(args.model)  # float32: its own conversion (run.py); other dtypes: cast here
    if args.dtype != "4bit" and model.language_model.model.embed_tokens.weight.dtype != getattr(mx, args.dtype):
        model.set_dtype(getattr(mx, args.dtype))
        mx.eval(model.parameters())
    out = {"load_s": now() - start, "rss_load_gb": rss_gb()}
    mx.reset_peak_memory()

    # generate_step computes the prompt embeddings itself: wrap that call to evaluate and time it.
    marks, embed = [], model.get_input_embeddings

    def timed_embeddings(*a, **k):
        result = embed(*a, **k)
        mx.eval(result.inputs_embeds)
        marks.append(now())
        return result

    model.get_input_embeddings = timed_embeddings

    t0 = now()  # what mlx_vlm.stream_generate does: chat template, then prepare_inputs (cv2 decode + processor)
    prompt = apply_chat_template(processor, model.config, QUESTION, num_images=0, video=args.video)
    inputs = prepare_inputs(processor, videos=[args.video], prompts=prompt, nframes=args.frames,
                            image_token_index=model.config.image_token_index)
    t_media = now()
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    times = [now() for _ in generate_step(inputs["input_ids"], model, inputs.get("pixel_values"),
                                          inputs.get("attention_mask"), max_tokens=TOKENS, temperature=0.0,
                                          **extra)]
    out.update(stages(t0, t_media, marks[0], times, inputs["input_ids"].shape[-1]),
               mlx_peak_gb=mx.get_peak_memory() / 1e9, frames_in=int(inputs["pixel_values_videos"].shape[1]))
    return out


def run_transformers(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration
    from transformers.video_utils import load_video

    dtype = getattr(torch, args.dtype)
    start = now()
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(args.model, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    out = {"load_s": now() - start, "rss_load_gb": rss_gb(), "torch_threads": torch.get_num_threads()}
    with open(os.path.join(args.model, "video_preprocessor_config.json")) as f:
        pp = json.load(f)
    cfg = model.config
    side, grid = pp["size"]["height"], cfg.vision_config.image_size // cfg.vision_config.patch_size

    t0 = now()
    # LlavaOnevisionVideoProcessor needs torchvision: the same steps (bicubic resize, rescale, normalize) in numpy.
    frames, _ = load_video(args.video, num_frames=args.frames, backend="pyav")
    mean, std = np.array(pp["image_mean"], np.float32), np.array(pp["image_std"], np.float32)
    pixels = np.stack([(np.asarray(Image.fromarray(f).resize((side, side), Image.Resampling.BICUBIC), np.float32)
                        * pp["rescale_factor"] - mean) / std for f in frames]).transpose(0, 3, 1, 2)[None]
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    n_video = len(frames) * math.ceil(grid / 2) ** 2 + 1  # LlavaOnevisionProcessor's count
    ids = torch.tensor([tokenizer(text.replace("<video>", "<video>" * n_video))["input_ids"]])
    t_media = now()
    with torch.inference_mode():
        feats = model.get_video_features(pixel_values_videos=torch.from_numpy(pixels).to(dtype)).pooler_output
        embeds = model.get_input_embeddings()(ids)
        mask = (ids == cfg.video_token_id)[..., None]
        embeds = embeds.masked_scatter(mask, feats.flatten(0, 1).to(embeds.dtype))
        t_vision = now()
        result = model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        times = []
        for _ in range(TOKENS):
            token = result.logits[:, -1].argmax(-1, keepdim=True)
            times.append(now())
            if len(times) < TOKENS:
                result = model(input_ids=token, past_key_values=result.past_key_values, use_cache=True)
    out.update(stages(t0, t_media, t_vision, times, ids.shape[-1]), mlx_peak_gb=None)
    return out


# --- the machine: MLX matmul rate and memory bandwidth -------------------------------------------------------


def probe(args) -> dict:
    import mlx_vidllm
    import mlx.core as mx
    import numpy as np

    def best(fn, reps=5):
        fn()
        return min(_timed(fn) for _ in range(reps))

    def _timed(fn):
        t = now()
        fn()
        return now() - t

    out = {"blas": mlx_vidllm._blas.status, "device": str(mx.default_device())}
    # float32 matmul at prefill-like shapes: (2048 tokens x K) @ (K x N)
    for name, (m, k, n) in {"lm": (2048, 896, 4864), "vision": (2048, 1152, 4304)}.items():
        a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
        mx.eval(a, b)
        out[f"matmul_{name}_gflops"] = 2 * m * k * n / best(lambda: mx.eval(a @ b)) / 1e9
        del a, b
    # Reading a large array: MLX's own reduction and decode-shaped matrix-vector product (x @ W.T, like a
    # Linear), and the same bytes through NumPy (its OpenBLAS, all cores). The floors use the fastest reader.
    x = mx.random.uniform(shape=(args.probe_mb * 2**20 // 4,))
    mx.eval(x)
    w, v = x.reshape(-1, 4096), mx.random.uniform(shape=(1, 4096))
    out["bandwidth_mlx_sum_gbs"] = x.nbytes / best(lambda: mx.eval(mx.sum(x))) / 1e9
    out["bandwidth_mlx_gemv_gbs"] = x.nbytes / best(lambda: mx.eval(v @ w.T)) / 1e9
    xn = np.array(x)
    del x, w
    wn, vn = xn.reshape(-1, 4096), np.ones(4096, np.float32)
    out["bandwidth_numpy_sum_gbs"] = xn.nbytes / best(lambda: xn.sum()) / 1e9
    out["bandwidth_numpy_gemv_gbs"] = xn.nbytes / best(lambda: wn @ vn) / 1e9
    out["probe_mb"] = args.probe_mb
    return out


SYSTEMS = {"mlx-vidllm": run_mlx_vidllm, "mlx-vlm": run_mlx_vlm, "transformers": run_transformers}


def main() -> None:
    ap = argparse.ArgumentParser(description="one benchmark measurement (see the module docstring)")
    ap.add_argument("--system", choices=sorted(SYSTEMS))
    ap.add_argument("--model")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--video")
    ap.add_argument("--second", default="stream,chat",
                    help="mlx-vidllm's second-question cases: stream (stream_generate again), chat (ChatSession), none")
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--probe-mb", type=int, default=1024)
    args = ap.parse_args()
    if args.probe:
        result = probe(args)
    else:
        result = {"system": args.system, "dtype": args.dtype, "frames": args.frames, **SYSTEMS[args.system](args)}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
