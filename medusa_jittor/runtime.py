"""The one place Jittor is configured; import ``jt`` from here, never ``jittor`` directly.

Jittor 1.3.11 needs three things settled *before* its first import:
- oneDNN: it downloads an archive at import unless the PyPI package ``jittor-offline`` (which
  carries that exact archive) is installed; we require it rather than fall back to ``use_mkl=0``,
  which makes matmuls ~7x slower.  (The ``mkl_*_path`` variables crash 1.3.11: never set them.)
- CUDA: on a machine with ``nvcc`` but no usable CUDA driver it crashes unless ``nvcc_path`` is
  empty, so CUDA is enabled only when a driver is really there (``JEDUSA_JITTOR_CUDA=0`` forces CPU).
- Compile cache: kernels are compiled into ``~/.cache/jittor`` (first import: ~3 minutes on a
  2-core CPU); the user is told instead of facing a silent pause.

And one thing after it: Jittor installs C-level handlers for SIGCHLD and SIGINT that end the whole
process (exit 1, no message with ``log_silent``) when *any* child process dies of a signal and on
Ctrl-C.  A server, a test runner or a recipe that kills a child of its own would die with it, and
Ctrl-C would skip every ``finally``; Python's own handlers are put back (``_restore_signals``).  It
also raises Python's recursion limit to 10^6, turning deep recursion (a deeply nested JSON body
sent to the server, say) into a C stack overflow; the limit is put back.
"""
from __future__ import annotations

import ctypes.util
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
CACHE_DIR = Path.home() / ".cache" / "jittor"


def cuda_driver_present() -> bool:
    if os.environ.get("JEDUSA_JITTOR_CUDA") == "0":
        return False
    return ctypes.util.find_library("cuda") is not None and Path("/dev/nvidiactl").exists()


def _import_jittor():
    if importlib.util.find_spec("jittor_offline") is None:
        raise ImportError("Jittor needs oneDNN offline: pip install jittor-offline (no downloads happen at run time)")
    if not cuda_driver_present():
        os.environ["nvcc_path"] = ""  # nvcc without a driver crashes Jittor's CUDA probe
    os.environ.setdefault("log_silent", "1")
    marker = CACHE_DIR / ".jedusa-compiled"  # ours: Jittor's own cache layout varies by compiler and CPU
    first = not marker.exists()
    if first:
        log.warning("first Jittor import: compiling its kernels into %s (about 3 minutes, once)", CACHE_DIR)
    start = time.perf_counter()
    recursion_limit = sys.getrecursionlimit()
    import jittor

    sys.setrecursionlimit(recursion_limit)  # Jittor sets 10^6: deep recursion must stay a RecursionError

    jittor.flags.use_cuda = int(cuda_driver_present() and jittor.has_cuda)
    _restore_signals()
    if first:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        log.warning("Jittor ready after %.0f s", time.perf_counter() - start)
    return jittor


def _restore_signals() -> None:
    """Python's SIGCHLD (default) and SIGINT (KeyboardInterrupt) handlers, replacing Jittor's exits."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; Jittor is imported there by every entry point
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


jt = _import_jittor()
