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
