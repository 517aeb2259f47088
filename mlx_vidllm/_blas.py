"""Fast CPU matmuls on Linux.

MLX's Linux CPU wheel links a reference BLAS (about 35x slower float32 matmuls
than OpenBLAS here). libmlx leaves `cblas_sgemm` & co. to the dynamic linker,
so an OpenBLAS loaded with RTLD_GLOBAL *before* `mlx.core` is imported provides
them. This runs on `import mlx_vidllm`; when it cannot help, it says so once.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",  # Debian/Ubuntu libopenblas0-pthread
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",  # Fedora/RHEL
    "/usr/lib/libopenblas.so.0",  # Arch
)
HINT = ("install OpenBLAS for ~35x faster CPU matmuls: `sudo apt-get install libopenblas0-pthread` "
        "(Debian/Ubuntu) or point MLX_VIDLLM_BLAS at a libopenblas.so")

status = "not linux"


def _loaded_openblas() -> bool:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return "libopenblas" in f.read()
    except OSError:
        return False


def preload() -> str:
    """Load OpenBLAS globally if MLX's CPU backend will use it; returns what happened."""
    global status
    if sys.platform != "linux" or os.environ.get("MLX_VIDLLM_BLAS") == "reference":
        status = "skipped"
        return status
    if _loaded_openblas():
        status = "openblas"
        return status
    if "mlx.core" in sys.modules:  # too late: libmlx already bound its BLAS symbols
        status = "reference (mlx was imported before mlx_vidllm)"
        return status
    paths = [os.environ["MLX_VIDLLM_BLAS"]] if os.environ.get("MLX_VIDLLM_BLAS") else list(CANDIDATES)
    for path in paths:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                status = "openblas"
                return status
            except OSError:
                continue
    status = "reference"
    return status


def warn_if_slow() -> None:
    """Say once, when running on MLX's CPU backend with the slow reference BLAS."""
    if not status.startswith("reference"):
        return
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        warnings.warn(f"MLX is using its slow reference BLAS on this machine; {HINT}", stacklevel=2)


# --- numpy's own OpenBLAS ------------------------------------------------------------------------------
# The CPU kernels run many small numpy products from several Python threads at once. OpenBLAS would
# split each of them across its own worker threads too (4 threads fighting over 2 cores, and its idle
# workers spin): those sections ask numpy's BLAS for one thread per call.

_SET_NAMES = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
              "openblas_set_num_threads")
_numpy_blas: tuple | None = None


def _numpy_blas_threads():
    """(get, set) for the OpenBLAS that numpy's wheel bundles, or None (Accelerate, MKL, not found)."""
    global _numpy_blas
    if _numpy_blas is None:
        import numpy  # noqa: F401  (loads its BLAS)

        _numpy_blas = ()
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
                paths = {line.split()[-1] for line in f if "openblas" in line and "numpy" in line}
        except OSError:
            paths = set()
        for path in paths:
            lib = ctypes.CDLL(path)
            for name in _SET_NAMES:
                if hasattr(lib, name):
                    get = getattr(lib, name.replace("set_num_threads", "get_num_threads"))
                    get.restype = ctypes.c_int
                    _numpy_blas = (get, getattr(lib, name))
                    break
    return _numpy_blas or None


class numpy_blas_single_thread:
    """Context manager: numpy's OpenBLAS runs each product on its calling thread."""

    def __enter__(self):
        self.blas = _numpy_blas_threads()
        if self.blas:
            self.before = self.blas[0]()
            self.blas[1](1)

    def __exit__(self, *exc):
        if self.blas:
            self.blas[1](self.before)
