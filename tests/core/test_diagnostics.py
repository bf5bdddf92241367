"""DistanceMonitor and gradient norms against numpy, on every backend (the
rest of the diagnostics is tested on TensorFlow in tests/diagnostics)."""

import numpy as np
import keras
import pytest
from keras import layers as L

import keras_spft


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype="float64")


def cnn(seed=0):
    keras.utils.set_random_seed(seed)
    base = keras.Sequential([keras.Input((6, 6, 3)), L.Conv2D(4, 3, name="c1"), L.BatchNormalization(name="bn"),
                             L.ReLU(), L.DepthwiseConv2D(3, name="dw"), L.GlobalAveragePooling2D(),
                             L.Dense(5, name="fc")], name="base")
    return keras.Sequential([keras.Input((6, 6, 3)), base, L.Dense(3, name="head")])


def data(n=16):
    rng = np.random.default_rng(0)
    return rng.random((n, 6, 6, 3)).astype("float32"), np.arange(n) % 3


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.keys = []

    def on_epoch_end(self, epoch, logs=None):
        self.keys.append(set(logs))


ROW_AXES = {"base/c1": (0, 1, 2), "base/dw": (0, 1), "base/fc": (0,), "head": (0,)}


def linear_model(anchor_strength=None):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, name="body"), L.Dense(2, name="head")])
    if anchor_strength:
        keras_spft.wrap_pretrained(model, method="l2-sp", strength=anchor_strength)
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_distance_monitor_matches_numpy():
    model = cnn()
    anchors = {p: to_np(model.get_layer(p.split("/")[0]).get_layer(p.split("/")[1]).kernel)
               for p in ("base/c1", "base/dw", "base/fc")}
    radius, head_radius = 0.05, 0.5
    keras_spft.wrap_pretrained(model, radius=radius, head_radius=head_radius)
    model.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before, monitor, after = Recorder(), keras_spft.DistanceMonitor(), Recorder()
    x, y = data()
    hist = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[before, monitor, after])
    h = hist.history
    assert len(h["spft/mars_max"]) == 2 and len(monitor.history) == 2
    # Callbacks after the monitor (TensorBoard, CSVLogger) see its keys; before it, not.
    assert "spft/base/c1/mars" in after.keys[-1]
    assert not any(k.startswith("spft/") for k in before.keys[-1])
    mars, n_at, n_rows, head_at, head_rows = [], 0, 0, 0, 0
    for path, axis in ROW_AXES.items():
        layer = model.get_layer("base").get_layer(path[5:]) if path.startswith("base/") else model.get_layer(path)
        w = to_np(layer.kernel)
        t = w - anchors[path] if path in anchors else w  # the head is anchored at 0
        rows = np.abs(t).sum(axis=axis)
        r = radius if path in anchors else head_radius
        key = f"spft/{path}" if path in anchors else f"spft/head/{path}"
        assert h[f"{key}/mars"][-1] == pytest.approx(rows.max(), rel=1e-6)
        assert h[f"{key}/frobenius"][-1] == pytest.approx(np.sqrt((t ** 2).sum()), rel=1e-6)
        frac = (rows >= (1 - 1e-3) * r).mean()
        assert h[f"{key}/at_bound"][-1] == pytest.approx(frac)
        if path in anchors:
            mars.append(rows.max())
            n_at += frac * rows.size
            n_rows += rows.size
        else:
            head_at += frac * rows.size
            head_rows += rows.size
    assert h["spft/mars_max"][-1] == pytest.approx(max(mars), rel=1e-6)
    assert h["spft/mars_mean"][-1] == pytest.approx(np.mean(mars), rel=1e-6)
    # Backbone and head rows apart (a bounded head kept the backbone's share
    # off 0 when the backbone's constraint never acted).
    assert h["spft/at_bound"][-1] == pytest.approx(n_at / n_rows)
    assert h["spft/head_at_bound"][-1] == pytest.approx(head_at / head_rows)
    # A large learning rate against a tiny radius: rows do sit on the bound.
    assert h["spft/at_bound"][-1] > 0.5


def test_gradient_norms_match_numpy():
    model = linear_model(anchor_strength=0.3)
    w1, b1 = (to_np(v) for v in model.get_layer("body").weights)
    w2, b2 = (to_np(v) for v in model.get_layer("head").weights)
    w1_0 = w1.copy()
    model.get_layer("body").kernel.assign(w1 + 0.1)  # away from the anchor
    w1 = w1 + 0.1
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 4)).astype("float32"), rng.normal(size=(6, 2)).astype("float32")
    h = x @ w1 + b1
    r = h @ w2 + b2 - y
    g_out = 2 * r / r.size  # d mean((out - y)^2)
    g_w2, g_b2 = h.T @ g_out, g_out.sum(0)
    g_h = g_out @ w2.T
    g_w1 = x.T @ g_h + 2 * 0.3 * (w1 - w1_0)  # + the L2-SP penalty
    g_b1 = g_h.sum(0)
    out = keras_spft.gradient_norms(model, x, y)
    assert out["body"] == pytest.approx(np.linalg.norm(g_w1), rel=1e-4)
    assert out["head/head"] == pytest.approx(np.linalg.norm(g_w2), rel=1e-4)
    total = np.sqrt(sum((g ** 2).sum() for g in (g_w1, g_b1, g_w2, g_b2)))
    assert out["global"] == pytest.approx(total, rel=1e-4)
    assert out["loss"] == pytest.approx((r ** 2).mean() + 0.3 * ((w1 - w1_0) ** 2).sum(), rel=1e-4)


def test_gradient_norms_of_layers_named_global_and_loss_keep_every_entry():
    """A layer named "global" or "loss" overwrote the entry of that name."""
    L = keras.layers
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, name="global"), L.Dense(3, name="loss"),
                              L.Dense(2, name="out")])
    keras_spft.wrap_pretrained(model, radius=1.0)
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((4, 4), "float32"), np.zeros((4, 2), "float32")
    out = keras_spft.gradient_norms(model, x, y)
    assert set(out) == {"global", "loss", "global.kernel", "loss.kernel", "head/out"}
    assert out["loss"] == pytest.approx(float(model.evaluate(x, y, verbose=0)), rel=1e-5)
    assert out["global"] > max(out["global.kernel"], out["loss.kernel"])


def test_gradient_norms_leave_batchnorm_statistics_alone():
    model = cnn()
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(8)
    state = [to_np(v) for v in model.non_trainable_variables]
    weights = [to_np(v) for v in model.trainable_variables]
    out = keras_spft.gradient_norms(model, x, y, training=True)
    assert out["global"] > 0
    for a, v in zip(state + weights, model.non_trainable_variables + model.trainable_variables):
        np.testing.assert_array_equal(a, to_np(v))


def test_a_free_head_of_several_layers_is_measured_as_the_head_wrap_took():
    # With head_radius=None the head carries no keras-spft object: the
    # diagnostics guessed again (the last kernel layer), took 'fc' for an
    # unanchored backbone layer, and a nested head stopped `fit`.
    keras.utils.set_random_seed(0)
    flat = keras.Sequential([keras.Input((4,)), L.Dense(8, name="c1"), L.Dense(8, name="fc"), L.Dense(3, name="out")])
    keras_spft.wrap_pretrained(flat, radius=0.1, head=["fc", "out"])
    roles = {k.path: k.role for k in keras_spft.diagnostics.tracked_kernels(flat)}
    assert roles == {"c1": "backbone", "fc": "head", "out": "head"}
    x, y = np.random.default_rng(0).random((16, 4)).astype("float32"), np.arange(16) % 3
    flat.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    monitor = keras_spft.DistanceMonitor()
    logs = flat.fit(x, y, epochs=1, batch_size=4, verbose=0, callbacks=[monitor]).history
    assert logs["spft/mars_max"][0] <= 0.1 * (1 + 1e-5)     # the backbone only: c1, bounded
    assert logs["spft/head/fc/mars"][0] > 0.1                # the free head moved beyond it

    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((4,)), L.Dense(8, name="c1")], name="base")
    nested = keras.Sequential([keras.Input((4,)), base,
                               keras.Sequential([L.Dense(8, name="fc"), L.Dense(3, name="out")], name="top")])
    keras_spft.wrap_pretrained(nested, radius=0.1, head=["top"])
    nested.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    logs = nested.fit(x, y, epochs=1, verbose=0, callbacks=[keras_spft.DistanceMonitor()]).history
    assert "spft/head/top/out/mars" in logs and "spft/base/c1/mars" in logs
    assert set(keras_spft.gradient_norms(nested, x[:4], y[:4])) >= {"global", "base/c1", "head/top/fc"}


def test_a_monitor_passed_to_another_model_measures_it_from_its_own_start():
    x, y = data()
    monitor, grads = keras_spft.DistanceMonitor(), keras_spft.GradientNormMonitor(x[:4], y[:4])
    for seed in (0, 1):
        model = cnn(seed)    # not wrapped: measured from the snapshot at the start
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        logs = model.fit(x, y, epochs=1, verbose=0, callbacks=[monitor, grads]).history
        assert logs["spft/base/c1/mars"][0] == 0.0, f"model {seed} measured from another model's weights"
    assert [h["epoch"] for h in grads.history] == [-1, 0, -1, 0]   # each model's start

    # A DeltaModel and its .model are one network: a second stage on the plain
    # model is measured from the same start as the first.
    model = cnn(2)
    delta = keras_spft.add_delta(model, feature_layers=["base/c1"], beta=0.0)
    delta.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    delta.fit(x, y, epochs=1, verbose=0, callbacks=[monitor])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    logs = model.fit(x, y, epochs=1, verbose=0, callbacks=[monitor]).history
    assert logs["spft/base/c1/mars"][0] > 0.0, "the second stage was measured from the first stage's end"


def test_monitor_rows_follow_the_constraint_axis_and_16_bit_rows_at_the_radius_count_as_at_bound():
    keras.utils.set_random_seed(0)
    # A MARSDistance attached by hand with rows over axes (0, 1) of a conv
    # kernel (the layer's own rows sum axes 0, 1, 2): 3 x 4 rows, per-row radii.
    model = keras.Sequential([keras.Input((5, 5, 3)), L.Conv2D(4, 2, name="c")])
    var = model.get_layer("c").kernel
    w0 = to_np(var)
    radii = np.linspace(0.05, 0.1, 12).reshape(1, 1, 3, 4).astype("float32")
    var.constraint = keras_spft.MARSDistance(w0, radii, axis=[0, 1])
    var.assign(var.constraint(w0 + 1.0))
    kernel = keras_spft.diagnostics.tracked_kernels(model)[0]
    assert kernel.axis == (0, 1)
    d = keras_spft.diagnostics.kernel_distances(kernel, to_np(var), w0)
    np.testing.assert_allclose(d["rows"], np.abs(to_np(var) - w0).sum(axis=(0, 1)).reshape(-1), rtol=1e-6)
    assert d["mars"] == pytest.approx(0.1, rel=1e-5) and d["at_bound"] == 1.0

    # 16-bit kernels are stored rounded: every row projected onto the radius
    # is at the bound (rows of L1 norm ~6.6: bfloat16 rounds them by ~0.05),
    # and a row that has not moved is not, even below the rounding.
    for dtype in ("float16", "bfloat16"):
        dense = keras.Sequential([keras.Input((64,)), L.Dense(32, name="d", dtype=dtype)])
        kvar = dense.get_layer("d").kernel
        a = to_np(kvar)
        kvar.constraint = keras_spft.MARSDistance(a.astype(dtype), 0.5)
        k = keras_spft.diagnostics.tracked_kernels(dense)[0]
        anchor = to_np(kvar.constraint.anchor)
        assert keras_spft.diagnostics.kernel_distances(k, to_np(kvar), anchor)["at_bound"] == 0.0
        kvar.constraint.radius.assign(0.02)   # below bfloat16's rounding of these rows
        assert keras_spft.diagnostics.kernel_distances(k, to_np(kvar), anchor)["at_bound"] == 0.0
        kvar.constraint.radius.assign(0.5)
        kvar.assign(kvar.constraint(keras.ops.cast(a + 1.0, dtype)))
        got = keras_spft.diagnostics.kernel_distances(k, to_np(kvar), anchor)
        assert got["at_bound"] == 1.0, (dtype, got["rows"].min())
    # A radius below bfloat16's rounding of the rows (~0.1 here): the rows
    # projected onto it are stored at 0.2-0.5 of it, and still at the bound.
    dense = keras.Sequential([keras.Input((576,)), L.Dense(64, name="d", dtype="bfloat16")])
    kvar = dense.get_layer("d").kernel
    a = to_np(kvar)
    kvar.constraint = keras_spft.MARSDistance(a.astype("bfloat16"), 0.02)
    noise = np.random.default_rng(0).normal(scale=0.01, size=a.shape)
    kvar.assign(kvar.constraint(keras.ops.cast(a + noise, "bfloat16")))
    k = keras_spft.diagnostics.tracked_kernels(dense)[0]
    assert keras_spft.diagnostics.kernel_distances(k, to_np(kvar), to_np(kvar.constraint.anchor))["at_bound"] == 1.0


def test_gradient_norms_of_a_model_trained_with_add_loss_alone():
    class Penalised(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = L.Dense(2, name="d")

        def call(self, x):
            out = self.d(x)
            self.add_loss(keras.ops.sum(out ** 2))
            return out

    keras.utils.set_random_seed(0)
    model = Penalised()
    x = np.ones((3, 4), "float32")
    model(x)
    model.compile(optimizer="sgd")
    norms = keras_spft.gradient_norms(model, x, None)
    w, b = to_np(model.d.kernel), to_np(model.d.bias)
    out = x @ w + b
    grad_w, grad_b = x.T @ (2 * out), (2 * out).sum(axis=0)      # of sum((xW + b)^2)
    assert norms["loss"] == pytest.approx(float((out ** 2).sum()), rel=1e-5)
    assert norms["global"] == pytest.approx(float(np.sqrt((grad_w ** 2).sum() + (grad_b ** 2).sum())), rel=1e-5)
