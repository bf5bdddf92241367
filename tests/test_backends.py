"""Runs the core suite on every Keras backend, beside the rest of the suite.

Keras fixes its backend per process, so `tests/core` runs here in a
subprocess per backend: TensorFlow, JAX and PyTorch, beside the rest of
the suite (one after another on a 2-core machine, see `_lanes`). In a
whole-suite run the current backend's copy runs here too, and the in-process
one is left out (tests/conftest.py); `pytest tests/core` alone runs it
in-process as usual. `tests/scale` and `tests/diagnostics` (current backend)
go last in the same lane, which has room left, instead of lengthening the
main run.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
import threading

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


_RUNS = {}   # run name (a backend, or a folder) -> _Run, started at collection (conftest.py)
_STOP = threading.Event()
# Slowest first, so that the last one to finish is a short one.
ORDER = ["jax", "tensorflow", "torch", "scale", "diagnostics"]
#: Folders run beside the main run on its backend (their selected tests;
#: conftest.py leaves their in-process copies out).
FOLDERS = ["scale", "diagnostics"]


class _Run:
    def __init__(self, name, backend, args):
        # args: a folder, or the ids of the tests selected in it (-k, -m)
        self.name, self.backend, self.args = name, backend, list(args)
        self.path = args[0] if len(args) == 1 else f"tests/{name if name in FOLDERS else 'core'} (selected tests)"
        self.proc = None
        self.out = tempfile.TemporaryFile(mode="w+")
        self.done = threading.Event()


def _lanes():
    """How many runs go side by side: one core is left to the main run,
    which takes longest. On the 2-core development machine they go one
    after another: three at once (and the main run) each got half a core,
    and the whole suite took 8.75 min, against 7.4 min one after another."""
    return max(1, min(len(ORDER), (os.cpu_count() or 2) - 1))


def _run_lane(runs):
    for run in runs:
        if not _STOP.is_set():
            # One compute thread each: the runs and the main run share the
            # machine's cores, and thread pools sized to all of them
            # oversubscribe it.
            env = dict(os.environ, KERAS_BACKEND=run.backend, KERAS_SPFT_SUBRUN="1", OMP_NUM_THREADS="1",
                       TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1",
                       XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip())
            run.proc = subprocess.Popen(
                # (pyproject's addopts has -q: one more would drop the summary line)
                [sys.executable, "-m", "pytest", *run.args, "-p", "no:cacheprovider", "-p", "no:warnings"],
                cwd=ROOT, env=env, stdout=run.out, stderr=subprocess.STDOUT, text=True,
            )
            run.proc.wait()
        run.done.set()


def _start_runs(session):
    """Starts `tests/core` on every other installed backend this session
    selected, beside the main run: in `_lanes()` lanes of runs one after
    another (independent processes)."""
    selected = {item.callspec.params["backend"] for item in session.items
                if getattr(item, "originalname", None) == "test_core_suite_on_backend"}
    here = not getattr(session.config, "_spft_core_in_subprocess", False)
    core = getattr(session.config, "_spft_core_args", ["tests/core"])
    new = [_Run(b, b, core) for b in selected
           if not ((here and b == keras.backend.backend()) or b in _RUNS
                   or not importlib.util.find_spec(MODULES[b]))]
    for folder, args in sorted(getattr(session.config, "_spft_beside", {}).items()):
        if folder not in _RUNS:
            new.append(_Run(folder, keras.backend.backend(), args))
    new.sort(key=lambda run: ORDER.index(run.name))
    _RUNS.update((run.name, run) for run in new)
    lanes = _lanes()
    for i in range(lanes):
        if new[i::lanes]:
            threading.Thread(target=_run_lane, args=(new[i::lanes],), daemon=True).start()


def stop_runs():
    """Kills the runs not waited for (session interrupted or failed early)."""
    _STOP.set()
    for run in _RUNS.values():
        if run.proc is not None and run.proc.poll() is None:
            run.proc.kill()
        run.done.wait(timeout=60)
        run.out.close()
    _RUNS.clear()
    _STOP.clear()


@pytest.mark.skipif(bool(os.environ.get("KERAS_SPFT_SUBRUN")), reason="already a per-backend run")
@pytest.mark.parametrize("backend", sorted(MODULES))
def test_core_suite_on_backend(backend, request):
    if backend == keras.backend.backend() and not getattr(request.config, "_spft_core_in_subprocess", False):
        pytest.skip(f"{backend} is the current backend: tests/core ran in this process")
    assert importlib.util.find_spec(MODULES[backend]), (
        f"{backend} is not installed: install the test extras, pip install -e '.[all,test]'"
    )
    _start_runs(request.session)  # normally started at collection (conftest.py)
    _wait(_RUNS[backend])


@pytest.mark.skipif(bool(os.environ.get("KERAS_SPFT_SUBRUN")), reason="already a run beside the main one")
@pytest.mark.parametrize("folder", FOLDERS)
def test_folder_beside(folder, request):
    if folder not in getattr(request.config, "_spft_beside", ()):
        pytest.skip(f"tests/{folder} ran in this process (or is not part of this run)")
    _start_runs(request.session)
    _wait(_RUNS[folder])


def _wait(run):
    # Before pytest-timeout's 900 s (addopts), so that the run's output is shown.
    if not run.done.wait(timeout=840):
        _STOP.set()
        if run.proc is not None:
            run.proc.kill()
        run.done.wait(timeout=30)
        run.out.seek(0)
        tail = "\n".join(run.out.read().splitlines()[-40:])
        pytest.fail(f"{run.path} on {run.backend} did not finish in 14 minutes:\n{tail}")
    run.out.seek(0)
    lines = run.out.read().splitlines()
    tail = "\n".join(lines[-40:])
    assert run.proc is not None and run.proc.returncode == 0, f"{run.path} failed on {run.backend}:\n{tail}"
    print(f"{run.path} on {run.backend}: {lines[-1]}")
