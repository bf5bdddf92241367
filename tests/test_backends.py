"""Runs the core suite on the Keras backends other than the current one.

Keras fixes its backend per process, so `tests/core` runs here in a
subprocess per backend: TensorFlow, JAX and PyTorch, side by side. In a
whole-suite run the current backend's copy runs here too, and the in-process
one is left out (tests/conftest.py); `pytest tests/core` alone runs it
in-process as usual.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


_RUNS = {}  # backend -> (process, output file), started together at collection (conftest.py)


def _start_runs(session):
    """Starts `tests/core` on every other installed backend this session
    selected, side by side (independent processes: together they take about as
    long as the slowest instead of the sum)."""
    selected = {item.callspec.params["backend"] for item in session.items
                if getattr(item, "originalname", None) == "test_core_suite_on_backend"}
    here = not getattr(session.config, "_spft_core_in_subprocess", False)
    for backend in sorted(selected):
        if ((here and backend == keras.backend.backend()) or backend in _RUNS
                or not importlib.util.find_spec(MODULES[backend])):
            continue
        out = tempfile.TemporaryFile(mode="w+")
        # One compute thread each: three backends and the main run share the
        # machine's cores, and thread pools sized to all of them oversubscribe
        # it (with the waits moved last, the whole suite went from 10.6 to 9.0
        # min on the 2-core development machine).
        env = dict(os.environ, KERAS_BACKEND=backend, KERAS_SPFT_SUBRUN="1", OMP_NUM_THREADS="1",
                   TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1",
                   XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip())
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "tests/core", "-q", "-p", "no:cacheprovider", "-p", "no:warnings"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
        )
        _RUNS[backend] = (proc, out)


def stop_runs():
    """Kills the runs not waited for (session interrupted or failed early)."""
    for proc, out in _RUNS.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
    _RUNS.clear()


@pytest.mark.skipif(bool(os.environ.get("KERAS_SPFT_SUBRUN")), reason="already a per-backend run")
@pytest.mark.parametrize("backend", sorted(MODULES))
def test_core_suite_on_backend(backend, request):
    if backend == keras.backend.backend() and not getattr(request.config, "_spft_core_in_subprocess", False):
        pytest.skip(f"{backend} is the current backend: tests/core ran in this process")
    assert importlib.util.find_spec(MODULES[backend]), (
        f"{backend} is not installed: install the test extras, pip install -e '.[all,test]'"
    )
    _start_runs(request.session)  # normally started at collection (conftest.py)
    proc, out = _RUNS[backend]
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out.seek(0)
    lines = out.read().splitlines()
    tail = "\n".join(lines[-40:])
    assert proc.returncode == 0, f"tests/core failed on {backend}:\n{tail}"
    print(f"{backend}: {lines[-1]}")
