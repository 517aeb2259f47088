"""mlx-vidllm: video-language models on Apple Silicon with MLX.

    from mlx_vidllm import load, generate
    model, processor = load("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    print(generate(model, processor, "What happens here?", video="clip.mp4"))
"""

from .generate import GenerationResponse, generate, stream_generate
from .loading import load

__all__ = ["load", "generate", "stream_generate", "GenerationResponse"]
__version__ = "0.1.0"
