"""mlx-vidllm: video-language models on Apple Silicon with MLX.

    from mlx_vidllm import load, generate
    model, processor = load("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    print(generate(model, processor, "What happens here?", video="clip.mp4"))

    from mlx_vidllm import convert
    convert("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "onevision-4bit", quantize=True)
"""

from . import _blas

_blas.preload()  # before anything imports mlx.core: see _blas.py

from .convert import convert  # light: mlx-lm, tqdm and huggingface_hub are imported when it runs
from .generate import GenerationResponse, generate, stream_generate
from .loading import load
from .chat import ChatSession

__all__ = ["load", "generate", "stream_generate", "ChatSession", "GenerationResponse", "convert"]
__version__ = "0.1.0"
