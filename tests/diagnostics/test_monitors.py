"""DistanceMonitor and GradientNormMonitor in training (TensorFlow; the
numbers against numpy on every backend: tests/core/test_diagnostics.py)."""


import numpy as np
import keras
import pytest
from keras import layers as L

import keras_spft
from keras_spft import diagnostics, plots
from tests.core.test_diagnostics import cnn, data, to_np


def test_distance_monitor_snapshot_for_unwrapped_models():
    model = cnn()
    start = to_np(model.get_layer("base").get_layer("fc").kernel)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    monitor = keras_spft.DistanceMonitor(per_layer=False, every=2)
    x, y = data()
    hist = model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[monitor])
    # every=2 logs epoch 2 and, always, the first and the last epoch (1, 3)
    assert [e["epoch"] for e in monitor.history] == [0, 1, 2]
    assert "spft/base/fc/mars" not in hist.history  # per_layer=False keeps logs short
    last = monitor.history[-1]
    t = to_np(model.get_layer("base").get_layer("fc").kernel) - start
    assert last["spft/base/fc/mars"] == pytest.approx(np.abs(t).sum(axis=0).max(), rel=1e-6)
    assert "spft/head/head/mars" in last and "spft/at_bound" not in last
    assert hist.history["spft/mars_max"][-1] > 0


def test_distance_monitor_measures_layers_unfrozen_later_from_the_same_start():
    """Two-stage fine-tuning with one monitor: the base frozen while the head
    trains, then unfrozen; its kernels are measured from the first start."""
    model = cnn()
    start = to_np(model.get_layer("base").get_layer("fc").kernel)
    model.get_layer("base").trainable = False
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    monitor = keras_spft.DistanceMonitor()
    x, y = data()
    first = model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    assert "spft/base/fc/mars" not in first.history
    model.get_layer("base").trainable = True
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    second = model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    t = to_np(model.get_layer("base").get_layer("fc").kernel) - start
    assert second.history["spft/base/fc/mars"][-1] == pytest.approx(np.abs(t).sum(axis=0).max(), rel=1e-6)


def test_distance_monitor_on_delta_model_ignores_the_frozen_copy():
    model = cnn()
    dm = keras_spft.DeltaModel(model, feature_layers=["base/dw"], alpha=1.0)
    dm.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    monitor = keras_spft.DistanceMonitor()
    x, y = data()
    dm.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    names = {k.name for k in diagnostics.tracked_kernels(dm)}
    assert names == {"base/c1", "base/dw", "base/fc", "head"}
    assert monitor.history[-1]["spft/base/c1/mars"] > 0


def test_gradient_norm_monitor_logs_into_history():
    model = cnn()
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    mon = keras_spft.GradientNormMonitor(x[:8], y[:8], per_layer=False)
    hist = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[mon])
    assert [e["epoch"] for e in mon.history] == [-1, 0, 1]
    assert len(hist.history["grad/global"]) == 2
    assert "grad/base/c1" not in hist.history and "grad/base/c1" in mon.history[-1]
    # the logged value is the gradient norm at the weights after that epoch
    assert hist.history["grad/global"][-1] == pytest.approx(
        keras_spft.gradient_norms(model, x[:8], y[:8])["global"], rel=1e-4)
    with pytest.raises(ValueError, match="compiled"):
        keras_spft.gradient_norms(cnn(), x, y)


def _compiled(model, lr=0.1):
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_a_monitor_reused_after_wrapping_measures_from_the_anchors():
    """Stage 1 unwrapped (the monitor snapshots the head's start), stage 2
    wrapped around the origin: the head was measured from the old snapshot."""
    model = _compiled(cnn())
    model.get_layer("base").trainable = False
    monitor = keras_spft.DistanceMonitor()
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    model.get_layer("base").trainable = True
    keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.3)
    _compiled(model, lr=0.5)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    head = to_np(model.get_layer("head").kernel)
    assert monitor.history[-1]["spft/head/head/mars"] == pytest.approx(np.abs(head).sum(axis=0).max(), rel=1e-6)
    assert monitor.history[-1]["spft/head/head/mars"] <= 0.3 * (1 + 1e-5)


def test_anchors_never_loaded_are_refused_not_read_as_zeros():
    model = cnn()
    keras_spft.wrap_pretrained(model, radius=0.05, head_radius=2.0)
    clone = keras.models.clone_model(model)      # objects rebuilt from their configs: no anchors
    clone.set_weights(model.get_weights())
    with pytest.raises(RuntimeError, match=r"anchor was never loaded"):
        keras_spft.bounds.theorem2_bound(clone, num_examples=8, num_classes=3, input_dim=108, input_bound=1.0)
    with pytest.raises(RuntimeError, match=r"anchor was never loaded"):
        diagnostics.snapshot_anchors(clone)


def test_a_head_named_by_its_nested_model():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((6, 6, 3)), L.Conv2D(4, 3, name="c1"), L.GlobalAveragePooling2D()],
                            name="base")
    top = keras.Sequential([keras.Input((4,)), L.Dense(3, name="fc")], name="top")
    model = keras.Sequential([keras.Input((6, 6, 3)), base, top])
    roles = {k.name: k.role for k in diagnostics.tracked_kernels(model, head="top")}
    assert roles == {"base/c1": "backbone", "top/fc": "head"}
    with pytest.raises(ValueError, match=r"head: layer 'topp' does not exist"):
        diagnostics.tracked_kernels(model, head=["topp"])
    # Every kernel wrapped: the roles come from the objects, no head to guess
    # (the monitor raised "cannot tell the new head").
    keras_spft.wrap_pretrained(model, radius=0.1, head=["top"], head_radius=2.0)
    monitor = keras_spft.DistanceMonitor()
    x, y = data()
    _compiled(model).fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    assert "spft/head/top/fc/mars" in monitor.history[-1] and "spft/base/c1/mars" in monitor.history[-1]
    assert diagnostics.gradient_norms(model, x[:4], y[:4])["head/top/fc"] > 0


def test_every_third_epoch_keeps_csvlogger_columns_and_a_slashed_prefix_keeps_aggregates(tmp_path):
    import csv

    model = _compiled(cnn())
    keras_spft.wrap_pretrained(model, radius=0.05, head_radius=2.0)
    _compiled(model)
    x, y = data()
    path = str(tmp_path / "log.csv")
    monitors = [keras_spft.DistanceMonitor(every=3, per_layer=False, prefix="train/spft"),
                keras_spft.GradientNormMonitor(x[:4], y[:4], every=3, per_layer=False)]
    watch = keras.callbacks.EarlyStopping(monitor="train/spft/mars_max", mode="max", patience=10)
    hist = model.fit(x, y, batch_size=8, epochs=5, verbose=0,
                     callbacks=monitors + [keras.callbacks.CSVLogger(path), watch])
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 5
    # A callback watching a monitor's key sees numbers only (NaN on skipped
    # epochs became EarlyStopping's "best", which nothing beats).
    assert watch.best == pytest.approx(max(hist.history["train/spft/mars_max"]))
    # Logged: the first epoch (CSVLogger's columns), every 3rd, the last; "NA" between.
    for key in ("train/spft/mars_max", "train/spft/at_bound", "grad/global"):
        assert [r[key] == "NA" for r in rows] == [False, True, False, True, False], key
        assert len(hist.history[key]) == 3
    assert "train/spft/base/c1/mars" not in rows[0]      # per_layer=False: aggregates only
    # The monitor itself keeps every layer, of the epochs it measured.
    assert set(plots.layer_distances(monitors[0], prefix="train/spft")) == {"base/c1", "base/dw", "base/fc"}
    assert [e["epoch"] for e in monitors[0].history] == [0, 2, 4]


def test_at_bound_of_an_l2_pgm_kernel_is_one_on_the_ball_and_zero_inside():
    model = _compiled(cnn(), lr=0.5)
    keras_spft.wrap_pretrained(model, method="l2-pgm", radius={"c1": 1e-3, "*": 100.0}, head_radius=100.0)
    _compiled(model, lr=0.5)
    monitor = keras_spft.DistanceMonitor()
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    last = monitor.history[-1]
    assert last["spft/base/c1/at_bound"] == 1.0 and last["spft/base/fc/at_bound"] == 0.0
    assert last["spft/base/c1/frobenius"] == pytest.approx(1e-3, rel=1e-3)


def test_a_probe_of_one_class_warns():
    """x[:32] of data ordered by class is one class: grad/global then stayed
    flat at ~18 while training accuracy reached 0.99 (a user's review)."""
    import warnings

    x = np.zeros((6, 4), "float32")
    with pytest.warns(UserWarning, match=r"probe batch holds one class only \(6 labels, all 2\)"):
        keras_spft.GradientNormMonitor(x, np.full(6, 2))
    with pytest.warns(UserWarning, match="one class only"):
        keras_spft.GradientNormMonitor(x, np.eye(3, dtype="float32")[[1] * 6])   # one-hot
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        keras_spft.GradientNormMonitor(x, np.arange(6) % 3)
        keras_spft.GradientNormMonitor(x, np.linspace(0, 1, 6).astype("float32"))   # regression targets
        keras_spft.GradientNormMonitor(x[:1], np.array([1]))                        # one example


def test_bad_diagnostics_options_are_named():
    """A review found these read silently: training="False" measured in
    training mode, tol=5 put every row at the bound, a misspelt metric or an
    epoch past the end gave {}, a list of runs failed with AttributeError."""
    x, y = data()
    for make, match in ((lambda: keras_spft.GradientNormMonitor(x[:4], y[:4], training="False"),
                         r"GradientNormMonitor: `training` must be True or False, got 'False'"),
                        (lambda: keras_spft.DistanceMonitor(per_layer="False"),
                         r"DistanceMonitor: `per_layer` must be True or False"),
                        (lambda: keras_spft.DistanceMonitor(tol=5), r"`tol` .* must be a number in \[0, 1\), got 5"),
                        (lambda: keras_spft.DistanceMonitor(every=0), r"DistanceMonitor: `every` must be an integer")):
        with pytest.raises(ValueError, match=match):
            make()
    model = cnn()
    keras_spft.wrap_pretrained(model, radius=0.5)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[keras_spft.DistanceMonitor()])
    assert plots.layer_distances(history, metric="mars")
    assert plots.layer_distances(history, epoch=-2) and plots.layer_distances(history, epoch=1)
    assert plots.layer_distances(history, epoch=np.argmin(history.history["loss"]))   # a numpy int
    for kwargs, match in ((dict(metric="MARS"), r"unknown metric 'MARS'; expected one of \('mars', 'frobenius', 'at_bound'\)"),
                          (dict(epoch=2), r"`epoch` must index the 2 logged epoch\(s\) \(-2 to 1\), got 2"),
                          (dict(epoch=-3), r"got -3"),
                          (dict(prefix="x"), r"no 'x/\.\.\.' values in this run: was a DistanceMonitor with prefix='x'.*'spft'")):
        with pytest.raises(ValueError, match=match):
            plots.layer_distances(history, **kwargs)
    with pytest.raises(ValueError, match=r"plot_distance_histograms: `results` must be a non-empty dict"):
        plots.plot_distance_histograms([history], "/tmp/never_written.png")
    with pytest.raises(ValueError, match=r"gradient_norms: `training` must be True or False"):
        keras_spft.gradient_norms(model, x[:4], y[:4], training="yes")


def test_a_probe_batch_of_unequal_lengths_is_refused():
    """A single target was broadcast over the whole probe batch by a mean
    squared error loss, and the gradient norms came out without a word."""
    model = keras.Sequential([keras.Input((4,)), L.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = np.zeros((8, 2), "float32")
    assert keras_spft.gradient_norms(model, x, y)["loss"] > 0
    assert keras_spft.gradient_norms(model, x, y, sample_weight=np.ones(8))["loss"] > 0
    for args, owner, found in (((x, y[:1]), "gradient_norms", r"8 \(x\), 1 \(y\)"),
                               ((x, y, np.ones(4)), "gradient_norms", r"8 \(x\), 4 \(sample_weight\)"),
                               ((x, np.float32(0.5)), "gradient_norms", r"8 \(x\), a single value \(y\)"),
                               ((x, [0.5] * 8), "gradient_norms", r"8 \(x\), 8 separate numbers \(y: a Python list\? give an array\)")):
        with pytest.raises(ValueError, match=owner + r": the probe batch's arrays must hold the same "
                                                     r"number of examples, got " + found):
            keras_spft.gradient_norms(model, *args)
    with pytest.raises(ValueError, match=r"GradientNormMonitor: .* got 8 \(x\), 1 \(y\)"):
        keras_spft.GradientNormMonitor(x, y[:1])


def test_distance_monitor_takes_a_numpy_tolerance():
    assert keras_spft.DistanceMonitor(tol=np.int64(0)).tol == 0.0
    assert keras_spft.DistanceMonitor(tol=np.float32(0.01)).tol == pytest.approx(0.01)
    for bad in (True, np.bool_(False), "0.1", float("nan"), 1):
        with pytest.raises(ValueError, match="`tol`"):
            keras_spft.DistanceMonitor(tol=bad)
