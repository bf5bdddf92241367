"""The guarantee after real optimizer steps: every PGM-wrapped kernel stays in
its ball, in model.fit (compiled or not, with gradient accumulation, mixed
precision) and in a custom loop with optimizer.apply; and rows do move."""

import numpy as np
import pytest
import keras

import keras_spft
from tests.core.helpers import assert_within_bound, to_np
from tests.core.models import small_cnn

PGM = ["mars-pgm", "mars-pgm-exact", "l2-pgm"]


def _data(n=32, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 12, 12, 3)).astype("float32"), rng.integers(0, classes, n)


def _constrained(model):
    return [(v, v.constraint) for v in model.trainable_variables
            if isinstance(v.constraint, (keras_spft.MARSDistance, keras_spft.FrobeniusDistance))]


class BoundChecker(keras.callbacks.Callback):
    """Checks the bound after every optimizer step (every batch)."""

    def __init__(self):
        super().__init__()
        self.checks = 0

    def on_train_batch_end(self, batch, logs=None):
        for var, c in _constrained(self.model):  # self.model syncs JAX state
            assert_within_bound(c, var)
        self.checks += 1


def _assert_rows_moved(model, radius):
    at_bound = moved = total = 0
    for var, c in _constrained(model):
        if c.anchor is None:
            continue
        d = assert_within_bound(c, var)
        d = np.atleast_1d(np.asarray(d)).reshape(-1)
        total += d.size
        moved += int((d > 0).sum())
        at_bound += int((d >= 0.99 * radius).sum())
    assert moved >= 0.9 * total, f"only {moved}/{total} rows moved"
    assert at_bound > 0, "no row reached the bound: the test does not exercise the projection"


@pytest.mark.parametrize("method", PGM)
@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_keeps_kernels_in_ball(method, jit_compile):
    keras.utils.set_random_seed(1)
    model = small_cnn()
    radius = 0.05
    keras_spft.wrap_pretrained(model, radius=radius, head_radius=0.5, method=method)
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    checker = BoundChecker()
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[checker])
    assert checker.checks == 8
    _assert_rows_moved(model, radius)


def test_fit_with_gradient_accumulation():
    keras.utils.set_random_seed(2)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
    model.compile(optimizer=keras.optimizers.Adam(0.05, gradient_accumulation_steps=2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    checker = BoundChecker()
    x, y = _data()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[checker])
    assert checker.checks == 8
    _assert_rows_moved(model, 0.05)


@pytest.mark.parametrize("method", PGM)
def test_custom_loop_with_optimizer_apply(method):
    keras.utils.set_random_seed(3)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=0.1, head_radius=0.3, method=method)
    opt = keras.optimizers.SGD(learning_rate=0.5)
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = [keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32"))
                 for v in model.trainable_variables]
        opt.apply(grads, model.trainable_variables)
        for var, c in _constrained(model):
            assert_within_bound(c, var)
    _assert_rows_moved(model, 0.1)


@pytest.fixture
def policy():
    yield keras.mixed_precision.set_dtype_policy
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy, name):
    policy(name)
    keras.utils.set_random_seed(4)
    model = small_cnn()
    report = keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
    for w in report.wrapped:
        if w.obj.anchor is not None:
            assert w.obj.anchor.dtype == "float32"
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    checker = BoundChecker()
    x, y = _data(16)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[checker])
    assert checker.checks == 4
    _assert_rows_moved(model, 0.05)


def test_penalty_methods_train_and_pull_towards_anchor():
    """SP methods: the penalty gradient reduces the distance the same run
    reaches without it (a behavioural check of the penalty in fit)."""
    x, y = _data(32)
    dists = {}
    for method, kw in (("none", {}), ("l2-sp", dict(strength=5.0))):
        keras.utils.set_random_seed(5)
        model = small_cnn()
        c2 = model.layers[0].get_layer("c2")
        k0 = to_np(c2.kernel).copy()
        keras_spft.wrap_pretrained(model, method=method, **kw)
        model.compile(optimizer=keras.optimizers.Adam(0.02),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        dists[method] = np.sqrt(((to_np(c2.kernel) - k0) ** 2).sum())
    assert dists["l2-sp"] < 0.7 * dists["none"]
