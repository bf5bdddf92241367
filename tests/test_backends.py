"""Runs the core suite on the Keras backends other than the current one.

Keras fixes its backend per process, so `pytest` runs `tests/core` in-process
on the current backend (TensorFlow by default) and, here, once more in a
subprocess for each other backend: TensorFlow, JAX and PyTorch all run.
"""

import importlib.util
import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


@pytest.mark.skipif(bool(os.environ.get("KERAS_SPFT_SUBRUN")), reason="already a per-backend run")
@pytest.mark.parametrize("backend", sorted(MODULES))
def test_core_suite_on_backend(backend):
    if backend == keras.backend.backend():
        pytest.skip(f"{backend} is the current backend: tests/core ran in this process")
    assert importlib.util.find_spec(MODULES[backend]), (
        f"{backend} is not installed: install the test extras, pip install -e '.[all,test]'"
    )
    env = dict(os.environ, KERAS_BACKEND=backend, KERAS_SPFT_SUBRUN="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/core", "-q", "-p", "no:cacheprovider", "-p", "no:warnings"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, f"tests/core failed on {backend}:\n{tail}"
    print(f"{backend}: {proc.stdout.strip().splitlines()[-1]}")
