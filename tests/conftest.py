"""Session-scoped offline fixtures shared by every test (see tests/fixtures/)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # make ``tests.fixtures`` importable under plain ``pytest`` too
    sys.path.insert(0, str(_REPO_ROOT))

DATA_DIR = Path(__file__).resolve().parent / "data"
REAL_VIDEO = DATA_DIR / "llavanext_xU25MMA2N4aVtYay.mp4"


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory) -> Path:
    """Folder with the offline-trained Qwen2-style tokenizer (AutoTokenizer-loadable, OneVision chat template)."""
    from tests.fixtures.tokenizer import build_qwen2_tokenizer

    out = tmp_path_factory.mktemp("qwen2_tokenizer")
    build_qwen2_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def onevision_default(tmp_path_factory) -> Path:
    """Tiny OneVision checkpoint, variant "default" (untied, 5x5 vision grid), Hub (legacy) key names."""
    from tests.fixtures.onevision import build_onevision

    return build_onevision(tmp_path_factory.mktemp("onevision_default"), "default", key_format="legacy")


@pytest.fixture(scope="session")
def onevision_tied(tmp_path_factory) -> Path:
    """Tiny OneVision checkpoint, variant "tied" (tied embeddings, 4x4 grid, 3 layers), Hub (legacy) key names."""
    from tests.fixtures.onevision import build_onevision

    return build_onevision(tmp_path_factory.mktemp("onevision_tied"), "tied", key_format="legacy")


@pytest.fixture(scope="session")
def onevision_default_v5(tmp_path_factory) -> Path:
    """Same weights as ``onevision_default`` but with transformers 5.x key names (``model.language_model.*``...)."""
    from tests.fixtures.onevision import build_onevision

    return build_onevision(tmp_path_factory.mktemp("onevision_default_v5"), "default", key_format="v5")


@pytest.fixture(scope="session")
def onevision_default_hub_config(tmp_path_factory) -> Path:
    """Same as ``onevision_default`` but config.json in the Hub's pre-v5 style (``text_config.rope_theta``)."""
    from tests.fixtures.onevision import build_onevision

    return build_onevision(
        tmp_path_factory.mktemp("onevision_default_hub_config"), "default", key_format="legacy", config_format="legacy"
    )


@pytest.fixture(scope="session")
def real_video() -> Path:
    """A short real mp4 (LLaVA-NeXT sample clip); the test is skipped if it has not been added to tests/data/."""
    if not REAL_VIDEO.exists():
        pytest.skip(f"{REAL_VIDEO} not present")
    return REAL_VIDEO


# --- Video-LLaVA ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def video_llava_default(tmp_path_factory) -> Path:
    """Tiny Video-LLaVA checkpoint: Hub (legacy) key names and a Hub-style config.json (defaults left out)."""
    from tests.fixtures.video_llava import build_video_llava

    return build_video_llava(tmp_path_factory.mktemp("video_llava_default"), key_format="legacy", config_format="hub")


@pytest.fixture(scope="session")
def video_llava_default_v5(tmp_path_factory) -> Path:
    """Same weights as ``video_llava_default``, transformers 5.x key names and config.json."""
    from tests.fixtures.video_llava import build_video_llava

    return build_video_llava(tmp_path_factory.mktemp("video_llava_default_v5"), key_format="v5", config_format="v5")


@pytest.fixture(scope="session")
def video_llava_default_reverted(tmp_path_factory) -> Path:
    """Same weights, as 5.23's plain ``save_pretrained()`` writes them (``image_tower.encoder.*``, legacy decoder)."""
    from tests.fixtures.video_llava import build_video_llava

    return build_video_llava(
        tmp_path_factory.mktemp("video_llava_default_reverted"), key_format="v5_reverted", config_format="v5"
    )


# --- LLaVA-Video ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llava_video_original(tmp_path_factory, onevision_default) -> Path:
    """Tiny ORIGINAL-format (LLaVA-NeXT) LLaVA-Video checkpoint with the weights of ``onevision_default``; its
    ``mm_vision_tower`` is a sibling folder holding a 3-layer SigLIP config (2 layers stored)."""
    from tests.fixtures.llava_video import build_llava_video_original

    root = tmp_path_factory.mktemp("llava_video_original")
    return build_llava_video_original(root / "ckpt", onevision_default, root / "siglip-tower")


@pytest.fixture(scope="session")
def llava_video_hf(tmp_path_factory, onevision_default) -> Path:
    """``onevision_default`` with the LLaVA-Video config fields a transformers conversion may keep."""
    from tests.fixtures.llava_video import build_llava_video_hf

    return build_llava_video_hf(tmp_path_factory.mktemp("llava_video_hf") / "ckpt", onevision_default)


# --- LLaMA-VID -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_vid_default(tmp_path_factory) -> Path:
    """Tiny LLaMA-VID checkpoint in the released layout (.bin shards + eva_vit_g.pth with one extra block +
    tokenizer.model + bert/vocab.txt), compress_type "mean" (2 tokens per frame), 56 px EVA."""
    from tests.fixtures.llama_vid import build_llama_vid

    return build_llama_vid(tmp_path_factory.mktemp("llama_vid_default"), "default")


@pytest.fixture(scope="session")
def llama_vid_long(tmp_path_factory) -> Path:
    """Tiny long-video LLaMA-VID: EVA inside the shards, rope_scaling linear x16, "mean_concat", 28 px EVA."""
    from tests.fixtures.llama_vid import build_llama_vid

    return build_llama_vid(tmp_path_factory.mktemp("llama_vid_long"), "long")
