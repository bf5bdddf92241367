import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _backend_runs_module(session):
    for item in session.items:
        if getattr(item, "originalname", None) == "test_core_suite_on_backend":
            return item.module
    return None


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
