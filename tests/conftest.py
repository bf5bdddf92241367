import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _backend_runs_module(session):
    for item in session.items:
        if getattr(item, "originalname", None) == "test_core_suite_on_backend":
            return item.module
    return None


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
    waits = [i for i in items if getattr(i, "originalname", None) == "test_core_suite_on_backend"]
    items[:] = [i for i in items if i not in waits] + waits
    import keras

    current = keras.backend.backend()
    if not any(i.callspec.params.get("backend") == current for i in waits):
        return
    core = os.path.join(os.path.dirname(os.path.abspath(__file__)), "core") + os.sep
    moved = [i for i in items if str(i.fspath).startswith(core)]
    if moved:
        items[:] = [i for i in items if not str(i.fspath).startswith(core)]
        config.hook.pytest_deselected(items=moved)
        config._spft_core_in_subprocess = True


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
