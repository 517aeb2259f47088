"""The PyTorch side of a parity check: per-family reference adapters and the recorder.

Every adapter runs the reference on the arrays our processor produced (so both sides see identical
inputs) and exposes the same stages: the vision tower output before the projector, the decoder's input
embeddings with the media merged in, the logits at chosen positions, and a decoder step with a KV cache
for greedy decoding.

* OneVision, Video-LLaVA, LLaVA-Video -hf in the `one_token` layout: transformers' own classes; the merged
  embeddings are what their forward hands its language model (captured with a hook), the logits what
  their forward returns.
* LLaVA-Video's `grid` / `frame` / `no_token` layouts and average/max pooling exist in no library: the
  LLaVA-NeXT composition of tests/test_llava_video.py (`torch_reference_embeds`) over transformers'
  OneVision modules.
* LLaMA-VID: the composition of tests/test_llama_vid.py (`torch_embeddings`) over the modules that
  tests/fixtures/llama_vid.py rebuilds from the released files.

TODO(parity): the two compositions still live in their families' test modules (their owners were still
finishing them); move them here once those families are done, and have the tests import them from here.

torch and transformers are imported inside the functions: neither is a run-time dependency.
"""

from __future__ import annotations

import json
import platform
import sys
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import DEFAULT_LAST, DEFAULT_STEPS, save_reference, select_positions

TORCH_MISSING = (
    "the parity recorder runs the PyTorch reference and needs torch: pip install \"mlx-vidllm[torch]\" "
    "(in a checkout: pip install -e \".[test]\", which the LLaVA-Video grid and LLaMA-VID references need "
    "anyway: they live in tests/); on a CUDA machine that installs PyPI's CUDA build of torch"
)
DTYPES = ("float32", "bfloat16", "float16")


def import_torch():
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError(TORCH_MISSING) from None
    return torch


def _torch_dtype(dtype: str):
    torch = import_torch()
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _test_helper(module: str, name: str):
    """A torch composition that still lives in a test module (see the TODO above)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "tests").is_dir() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        mod = __import__(module, fromlist=[name])
        return getattr(mod, name)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(
            f"this reference needs {name} from {module.replace('.', '/')}.py, importable from a checkout of "
            f"the mlx-vidllm repository (with the test extra installed): {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------------- adapters


class TorchReference:
    """What the recorder needs from a reference; subclasses fill in the family specifics."""

    kind = "?"

    def __init__(self, device: str, dtype: str):
        self.torch = import_torch()
        self.device = device
        self.dtype = _torch_dtype(dtype)

    # inputs -----------------------------------------------------------------------------------
    def tensor(self, a, floating: bool = True):
        t = self.torch.as_tensor(np.asarray(a))
        if floating and t.is_floating_point():
            return t.to(device=self.device, dtype=self.dtype)
        return t.to(self.device)

    # stages -----------------------------------------------------------------------------------
    def vision_features(self, inputs: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def forward(self, inputs: dict[str, Any], positions: np.ndarray):
        """(merged input embeddings (1, L, D), logits at `positions` (P, vocab))."""
        raise NotImplementedError

    def embed(self, ids):
        raise NotImplementedError

    def decode(self, embeds, past):
        """One decoder call with a KV cache: (logits of the last position (vocab,), new cache)."""
        raise NotImplementedError

    def greedy(self, embeds, steps: int) -> tuple[list[int], list[float]]:
        """`steps` greedy tokens from the merged embeddings (no EOS stop) and the top-1 minus top-2 logit
        margin at each step."""
        tokens, margins = [], []
        logits, past = self.decode(embeds, None)
        for i in range(steps):
            logits = logits.float()
            top2 = self.torch.topk(logits, 2).values
            tok = int(logits.argmax())
            tokens.append(tok)
            margins.append(float(top2[0] - top2[1]))
            if i + 1 < steps:
                logits, past = self.decode(self.embed(self.tensor([[tok]], floating=False)), past)
        return tokens, margins

    def describe(self) -> dict:
        return {"kind": self.kind}


class HFLlava(TorchReference):
    """A transformers LLaVA-style model (`.model.language_model`, `.lm_head`) run by its own forward."""

    cls_name = ""

    def __init__(self, path, device: str, dtype: str):
        super().__init__(device, dtype)
        import transformers

        cls = getattr(transformers, self.cls_name)
        self.path = str(path)
        self.model = cls.from_pretrained(self.path, dtype=self.dtype, attn_implementation="eager").to(device).eval()
        self.kind = f"transformers.{self.cls_name}"

    @property
    def decoder(self):
        return self.model.model.language_model

    def embed(self, ids):
        return self.model.get_input_embeddings()(ids)

    def decode(self, embeds, past):
        out = self.decoder(inputs_embeds=embeds, past_key_values=past, use_cache=True)
        return self.model.lm_head(out.last_hidden_state[0, -1]), out.past_key_values

    def torch_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def tower_features(self, tower, pixels) -> Any:
        """hidden_states[vision_feature_layer] of a tower for channels-last pixels (N, S, S, 3)."""
        px = self.tensor(pixels).permute(0, 3, 1, 2)
        layer = self.model.config.vision_feature_layer
        return tower(px, output_hidden_states=True).hidden_states[layer]

    def forward(self, inputs, positions):
        captured = {}

        def grab(module, args, kwargs):
            captured["embeds"] = kwargs["inputs_embeds"]

        handle = self.decoder.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            keep = self.torch.as_tensor(np.asarray(positions), dtype=self.torch.long, device=self.device)
            out = self.model(**self.torch_inputs(inputs), logits_to_keep=keep)
        finally:
            handle.remove()
        return captured["embeds"], out.logits[0]

    def describe(self) -> dict:
        return {"kind": self.kind, "weights": self.path, "attn_implementation": "eager"}


class OneVisionReference(HFLlava):
    cls_name = "LlavaOnevisionForConditionalGeneration"

    def torch_inputs(self, inputs):
        """As tests/test_onevision.py's to_torch: channels-first, batched like transformers' processor."""
        out = {"input_ids": self.tensor(inputs["input_ids"], floating=False).long()}
        if inputs.get("pixel_values") is not None:
            pix = self.tensor(inputs["pixel_values"]).permute(0, 3, 1, 2)
            # one image: (1, views, C, S, S); several: one view each, (images, 1, C, S, S)
            out["pixel_values"] = pix[:, None] if inputs["batch_num_images"][0] > 1 else pix[None]
            out["image_sizes"] = self.tensor(inputs["image_sizes"], floating=False)
            out["batch_num_images"] = self.tensor(inputs["batch_num_images"], floating=False)
        videos = inputs.get("pixel_values_videos") or []
        if len(videos) > 1:
            raise ValueError("the OneVision reference takes one video per prompt")
        if videos:
            out["pixel_values_videos"] = self.tensor(videos[0]).permute(0, 3, 1, 2)[None]
        return out

    def vision_features(self, inputs):
        tower = self.model.model.vision_tower
        out = {}
        if inputs.get("pixel_values") is not None:
            out["image"] = self.tower_features(tower, inputs["pixel_values"])
        for i, v in enumerate(inputs.get("pixel_values_videos") or []):
            out[f"video.{i}"] = self.tower_features(tower, v)
        return out


class VideoLlavaReference(HFLlava):
    cls_name = "VideoLlavaForConditionalGeneration"

    def torch_inputs(self, inputs):
        """As tests/test_video_llava.py's to_torch."""
        out = {"input_ids": self.tensor(inputs["input_ids"], floating=False).long()}
        if inputs.get("pixel_values") is not None:
            out["pixel_values"] = self.tensor(inputs["pixel_values"]).permute(0, 3, 1, 2)
        if inputs.get("pixel_values_videos"):
            out["pixel_values_videos"] = self.tensor(np.stack(inputs["pixel_values_videos"])).permute(0, 1, 4, 2, 3)
        return out

    def vision_features(self, inputs):
        out = {}
        if inputs.get("pixel_values") is not None:
            out["image"] = self.tower_features(self.model.model.image_tower, inputs["pixel_values"])
        for i, v in enumerate(inputs.get("pixel_values_videos") or []):
            out[f"video.{i}"] = self.tower_features(self.model.model.video_tower, v)
        return out


class LlavaVideoComposition(OneVisionReference):
    """LLaVA-Video's video path (grid / frame / no_token layouts, average / max pooling) composed from
    transformers' OneVision modules as LLaVA-NeXT's llava_arch.py does it; video-only prompts."""

    def __init__(self, path, device: str, dtype: str, layout: str, pool: str):
        super().__init__(path, device, dtype)
        self.layout, self.pool = layout, pool
        self.compose = _test_helper("tests.test_llava_video", "torch_reference_embeds")
        self.kind = "composition: tests/test_llava_video.py::torch_reference_embeds over " + self.kind

    def forward(self, inputs, positions):
        if inputs.get("pixel_values") is not None:
            raise ValueError(f"the LLaVA-Video {self.layout} reference covers video-only prompts (drop --image)")
        with self.torch.device(self.device):  # the composition builds its tensors with torch.tensor(...)
            embeds = self.compose(self.model, inputs, self.layout, self.pool)
        hidden = self.decoder(inputs_embeds=embeds).last_hidden_state
        keep = self.torch.as_tensor(np.asarray(positions), dtype=self.torch.long, device=self.device)
        return embeds, self.model.lm_head(hidden[0, keep])

    def describe(self) -> dict:
        return {**super().describe(), "video_layout": self.layout, "pool_mode": self.pool}


class LlamaVidComposition(TorchReference):
    """LLaMA-VID composed from the PyTorch modules tests/fixtures/llama_vid.py rebuilds from the released files
    (InstructBLIP's EVA and QFormer, the projections, LlamaForCausalLM) by tests/test_llama_vid.py."""

    def __init__(self, path, device: str, dtype: str):
        super().__init__(device, dtype)
        load_ref = _test_helper("tests.fixtures.llama_vid", "load_reference")
        self.compose = _test_helper("tests.test_llama_vid", "torch_embeddings")
        self.path = str(path)
        self.ref = load_ref(path)
        for name in ("eva", "ln_vision", "qformer", "text_proj", "key_proj", "value_proj", "mm_projector", "llm"):
            getattr(self.ref, name).to(device=device, dtype=self.dtype)
        self.ref.query_tokens.data = self.ref.query_tokens.data.to(device=device, dtype=self.dtype)
        self.kind = "composition: tests/test_llama_vid.py::torch_embeddings over tests/fixtures/llama_vid.py modules"

    def embed(self, ids):
        return self.ref.llm.get_input_embeddings()(ids)

    def decode(self, embeds, past):
        out = self.ref.llm.model(inputs_embeds=embeds, past_key_values=past, use_cache=True)
        return self.ref.llm.lm_head(out.last_hidden_state[0, -1]), out.past_key_values

    def vision_features(self, inputs):
        out = {}

        def eva(pixels):
            px = self.tensor(pixels).permute(0, 3, 1, 2)
            return self.ref.eva(px, output_hidden_states=True).hidden_states[self.ref.eva_depth]

        if inputs.get("pixel_values") is not None:
            out["image"] = eva(inputs["pixel_values"])
        for i, v in enumerate(inputs.get("pixel_values_videos") or []):
            out[f"video.{i}"] = eva(v)
        return out

    def forward(self, inputs, positions):
        with self.torch.device(self.device):  # the composition builds its tensors with torch.tensor(...)
            embeds = self.compose(self.ref, inputs, self.ref.config.get("compress_type"))[None]
        hidden = self.ref.llm.model(inputs_embeds=embeds).last_hidden_state
        keep = self.torch.as_tensor(np.asarray(positions), dtype=self.torch.long, device=self.device)
        return embeds, self.ref.llm.lm_head(hidden[0, keep])

    def describe(self) -> dict:
        return {"kind": self.kind, "weights": self.path}


def make_reference(family: str, path: Path, config: dict, device: str, dtype: str, options: dict,
                   torch_model: str | Path | None = None) -> TorchReference:
    """The PyTorch reference for a model folder of `family` (`torch_model`: a transformers-format folder with
    the same weights, for a checkpoint format transformers cannot load)."""
    weights = Path(torch_model) if torch_model else path
    if family == "llava_onevision":
        return OneVisionReference(weights, device, dtype)
    if family == "video_llava":
        return VideoLlavaReference(weights, device, dtype)
    if family == "llava_video":
        if not torch_model and config.get("model_type") != "llava_onevision":
            raise ValueError(f"{path}: transformers cannot load the original LLaVA-NeXT format; pass --torch-model, "
                             f"a transformers-format (llava_onevision) folder holding the same weights")
        layout, pool = options.get("video_layout", "grid"), options.get("pool_mode", "bilinear")
        if (layout, pool) == ("one_token", "bilinear"):
            return OneVisionReference(weights, device, dtype)
        return LlavaVideoComposition(weights, device, dtype, layout, pool)
    if family == "llama_vid":
        return LlamaVidComposition(weights, device, dtype)
    raise ValueError(f"no PyTorch reference for the {family} family")


# ----------------------------------------------------------------------------------------------------- inputs


def build_inputs(processor, family: str, prompt: str, video=None, images: Sequence = (), num_frames=None,
                 fps=None, max_frames=None) -> tuple[dict, str, dict]:
    """Our processor's output for the prompt and media, as `generate` builds it; video files are decoded to
    frames (never to LLaMA-VID's cached features), so every input is an array. Returns (inputs, text, media)."""
    media: dict[str, Any] = {"images": [str(i) for i in images]}
    videos = []
    if video is not None:
        if hasattr(processor, "video_indices"):  # LLaMA-VID: its sampling rule, but the frames themselves
            from ..media.video import read_frames

            indices, rule = processor.video_indices(video, num_frames, fps, max_frames)
            frames = read_frames(video, indices, transform=processor.frame_transform)
            media["video"] = {"rule": rule, "indices": [int(i) for i in indices]}
        else:
            frames = processor.load_video(video, num_frames=num_frames, fps=fps, max_frames=max_frames)
            # LLaVA-Video: what was sampled (the time instruction) travels with the frames or the processor
            sampling = getattr(frames, "sampling", None) or getattr(processor, "last_sampling", None)
            media["video"] = {"indices": [int(i) for i in sampling.indices]} if sampling is not None else {}
        media["video"].update(path=str(video), name=Path(video).name, frames=int(len(frames)),
                              num_frames=num_frames, fps=fps, max_frames=max_frames)
        videos.append(frames)
    text = processor.format_prompt(prompt, len(images), len(videos))
    guided = {"question": prompt} if getattr(processor, "takes_question", False) else {}
    inputs = processor(text, images=list(images), videos=videos or None, **guided)
    return inputs, text, media


def readable_ids(processor, ids, media: Sequence[int]) -> str:
    """The prompt as the model sees it (what the processor added included), media runs shown as a count."""
    out, run, text = [], 0, []

    def flush_text():
        if text:
            out.append(processor.tokenizer.decode(text))
            text.clear()

    for i in [int(x) for x in np.asarray(ids).reshape(-1)]:
        if i in media:
            flush_text()
            run += 1
            continue
        if run:
            out.append(f"<{run} media tokens>")
            run = 0
        text.append(i)
    flush_text()
    if run:
        out.append(f"<{run} media tokens>")
    return "".join(out)


def media_token_ids(processor, family: str) -> list[int]:
    ids = [getattr(processor, a, None) for a in ("image_token_id", "video_token_id")]
    if family == "llama_vid":
        from ..models.llama_vid import IMAGE_TOKEN_INDEX

        ids.append(IMAGE_TOKEN_INDEX)
    return [int(i) for i in ids if i is not None]


# ----------------------------------------------------------------------------------------------------- record


def _versions(torch) -> dict:
    import transformers

    import mlx_vidllm

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
           "mlx_vidllm": mlx_vidllm.__version__, "python": platform.python_version(), "platform": platform.platform()}
    try:
        import mlx.core as mx

        out["mlx"] = mx.__version__
    except Exception:  # noqa: BLE001 - informative only
        pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


@contextmanager
def _exact_float32(torch):
    """No TF32 (cuBLAS / cuDNN) while recording: a float32 reference must be float32 all the way."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def record(model, out, prompt: str, video=None, images: Sequence = (), *, device: str = "cpu",
           dtype: str = "float32", steps: int = DEFAULT_STEPS, last: int = DEFAULT_LAST, num_frames: int | None = None,
           fps: float | None = None, max_frames: int | None = None, video_layout: str | None = None,
           pool_mode: str | None = None, torch_model=None, fixture: dict | None = None,
           threads: int | None = None) -> Path:
    """Run the PyTorch reference of `model` on our processor's output for `prompt` + media and write the
    reference file `out` (see the package docstring for its contents). Returns the path written."""
    torch = import_torch()
    from ..loading import load, model_config, read_config, resolve_path
    from ..models.families import detect_family

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device (a CPU-only torch build, or no GPU)")
    if threads:
        torch.set_num_threads(threads)
    path = resolve_path(model)
    config = read_config(path)
    family = detect_family(model_config(config)).name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, processor = load(path, video_layout=video_layout, pool_mode=pool_mode)  # the processor is what we need
        inputs, text, media = build_inputs(processor, family, prompt, video, images, num_frames, fps, max_frames)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    options = {}
    if family in ("llava_onevision", "llava_video"):
        options = {"video_layout": processor.config.video_layout, "pool_mode": processor.config.pool_mode}
    media_ids = media_token_ids(processor, family)
    positions = select_positions(inputs["input_ids"], media_ids, last)

    with _exact_float32(torch), torch.no_grad():
        ref = make_reference(family, path, config, device, dtype, options, torch_model)
        vision = {k: _np(v) for k, v in ref.vision_features(inputs).items()}
        embeds, logits = ref.forward(inputs, positions)
        tokens, margins = ref.greedy(embeds, steps)

    info = path / "fixture_info.json"
    meta = {
        "family": family, "dtype": dtype, "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "prompt": prompt, "text": text, "input_text": readable_ids(processor, inputs["input_ids"], media_ids),
        "media": media, "options": options, "steps": steps, "last": last,
        "reference": ref.describe(),
        "model": {"path": str(model), "config": model_config(config), "fixture": fixture or (
            json.loads(info.read_text()) if info.exists() else None)},
        "versions": _versions(torch),
        "torch_settings": {"tf32": False, "float32_matmul_precision": "highest", "threads": torch.get_num_threads()},
        "warnings": [str(w.message) for w in caught],
    }
    return save_reference(out, meta, inputs, vision, _np(embeds[0]), positions, _np(logits), tokens, margins)
