"""Where the CUDA backend finds cuBLASLt: the C++ core dlopens libcublasLt.so.<major> when a CUDA
backend is created (never at import). When the library sits only inside a pip wheel (nvidia-cublas,
as PyTorch installs it), preload_cublaslt() loads it by path first, so that the core's lookup by
soname finds it already loaded. $LSERVE_CUBLASLT_LIBRARY, when set, wins over both.
"""
from __future__ import annotations

import ctypes
import os
import pathlib
from typing import List, Optional


def _wheel_candidates() -> List[pathlib.Path]:
    try:
        import nvidia  # namespace package of NVIDIA's pip wheels
    except ImportError:
        return []
    found = []
    for root in getattr(nvidia, "__path__", []):
        for sub in ("cu13", "cublas"):
            found.extend(sorted(pathlib.Path(root, sub, "lib").glob("libcublasLt.so.*")))
    return found


def preload_cublaslt() -> Optional[str]:
    """Loads the pip-installed libcublasLt (process-wide, RTLD_GLOBAL); returns its path, or None
    when $LSERVE_CUBLASLT_LIBRARY is set or no wheel holds one (the core then searches the loader
    path and the CUDA toolkit itself)."""
    if os.environ.get("LSERVE_CUBLASLT_LIBRARY"):
        return None
    for path in _wheel_candidates():
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            return str(path)
        except OSError:
            continue
    return None
