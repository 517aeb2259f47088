"""The command line end to end on a tiny checkpoint and the real example clip."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from mlx_vidllm import generate, load
from mlx_vidllm.cli import main

EXAMPLE_VIDEO = "examples/videollava_sample_demo_1.mp4"
EXAMPLE_IMAGE = "examples/videollava_extreme_ironing.jpg"


def test_help_explains_the_command():
    result = CliRunner().invoke(main, ["generate", "--help"])
    assert result.exit_code == 0
    for flag in ("--model", "--video", "--image", "--prompt", "--max-tokens", "--temp", "--top-p", "--seed",
                 "--num-frames", "--fps", "--max-frames", "--system", "--verbose", "Exit codes"):
        assert flag in result.output


def test_cli_answers_about_the_example_clip(onevision_default):
    """Streams the same greedy answer as the Python API, exit code 0, stats on stderr with --verbose."""
    args = ["generate", "--model", str(onevision_default), "--video", EXAMPLE_VIDEO,
            "--prompt", "What happens in this video?", "--max-tokens", "12", "--num-frames", "4", "--verbose"]
    proc = subprocess.run([sys.executable, "-m", "mlx_vidllm.cli", *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    model, processor = load(onevision_default)
    expected = generate(model, processor, "What happens in this video?", video=EXAMPLE_VIDEO, max_tokens=12,
                        num_frames=4)
    assert expected.strip()
    assert proc.stdout == expected + "\n"
    assert "time to first token" in proc.stderr and "prompt tokens" in proc.stderr


def test_cli_image_prompt(onevision_default):
    result = CliRunner().invoke(main, ["generate", "--model", str(onevision_default), "--image", EXAMPLE_IMAGE,
                                       "--prompt", "Describe.", "--max-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_cli_bad_input_is_one_line(onevision_default, tmp_path):
    missing = tmp_path / "nope.mp4"
    result = CliRunner().invoke(main, ["generate", "--model", str(onevision_default), "--video", str(missing),
                                       "--prompt", "x"])
    assert result.exit_code == 3
    assert result.output.strip() == f"error: {missing}: no such file"
    result = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "no-model"), "--video", EXAMPLE_VIDEO,
                                       "--prompt", "x"])
    assert result.exit_code == 4 and result.output.startswith("error: ") and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["generate", "--model", str(onevision_default), "--prompt", "x"])
    assert result.exit_code == 2 and "--video" in result.output
