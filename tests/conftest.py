import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_DESELECTED = []   # by -k, -m, --deselect (before the hook below)


def pytest_deselected(items):
    _DESELECTED.extend(items)


_WAITS = ("test_core_suite_on_backend", "test_folder_beside")   # tests/test_backends.py


def _backend_runs_module(session):
    for item in session.items:
        if getattr(item, "originalname", None) in _WAITS:
            return item.module
    return None


def _leave_out(config, items, folder):
    """Deselects the in-process copy of `tests/<folder>` (it runs beside);
    returns what the run beside takes: the folder, or the ids of the tests
    selected in it when -k, -m or --deselect left some out; `None` if none."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), folder) + os.sep
    inside = lambda item: str(item.fspath).startswith(root)  # noqa: E731
    moved = [i for i in items if inside(i)]
    if not moved:
        return None
    # The whole folder, unless -k & co. left tests out of it or the command
    # line named only part of it (a file, a test id).
    whole = any("::" not in a and root.startswith(os.path.abspath(a).rstrip(os.sep) + os.sep) for a in config.args)
    subset = not whole or any(inside(i) for i in _DESELECTED)
    items[:] = [i for i in items if not inside(i)]
    config.hook.pytest_deselected(items=moved)
    return [i.nodeid for i in moved] if subset else [f"tests/{folder}"]


# After -k / -m / --deselect (trylast): only waits they kept move their tests.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    # When tests/test_backends.py runs tests/core on the current backend too
    # (a whole-suite run), the in-process copy of tests/core is left out: the
    # three backends' core runs then go in subprocesses (test_backends._lanes), beside
    # the rest of the suite, instead of the current one lengthening it.
    if os.environ.get("KERAS_SPFT_SUBRUN") or config.option.collectonly:
        return
    # The tests that wait for the per-backend runs go last: waiting where
    # tests/test_backends.py sorts (before test_docs and workflow) kept this
    # process idle while the subprocesses ran, and then ran the rest alone.
    waits = [i for i in items if getattr(i, "originalname", None) in _WAITS]
    items[:] = [i for i in items if i not in waits] + waits
    # tests/scale and tests/diagnostics (current backend) run beside too, in
    # the same lane after the core runs, which leave it room: the main run
    # was the longest (10 min; the lane 5.6).
    config._spft_beside = {}   # folder -> what its run beside takes (tests/test_backends.py)
    for folder in sorted({i.callspec.params["folder"] for i in waits if i.originalname == "test_folder_beside"}):
        args = _leave_out(config, items, folder)
        if args:
            config._spft_beside[folder] = args
    import keras

    current = keras.backend.backend()
    if not any(i.originalname == "test_core_suite_on_backend" and i.callspec.params.get("backend") == current
               for i in waits):
        return
    args = _leave_out(config, items, "core")
    if args:
        config._spft_core_in_subprocess = True
        config._spft_core_args = args


def pytest_collection_finish(session):
    # Start the JAX and PyTorch runs of tests/core (tests/test_backends.py)
    # as soon as the session is known: they run beside the in-process suite,
    # which mostly keeps one of two cores busy, instead of after it.
    module = _backend_runs_module(session)
    if (module is not None and not os.environ.get("KERAS_SPFT_SUBRUN")
            and not session.config.option.collectonly):
        module._start_runs(session)


def pytest_sessionfinish(session):
    module = _backend_runs_module(session)
    if module is not None:
        module.stop_runs()
