"""Faults: non-finite values, diverging runs, kill-and-resume."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import keras
from keras import ops

import keras_spft

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e18, 1e36])
@pytest.mark.parametrize("radius", [1e-30, 1e-3, 1.0, 1e30])
def test_projections_keep_finite_weights_finite(scale, radius):
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(3, 3, 4, 5)) * scale).astype("float32")
    w[..., 0] = 0.0  # a zero row
    a = (rng.normal(size=w.shape) * scale).astype("float32")
    for c in (keras_spft.MARSDistance(a, radius, axis=[0, 1, 2]),
              keras_spft.MARSDistance(a, radius, axis=[0, 1, 2], projection="exact"),
              keras_spft.FrobeniusDistance(a, radius),
              keras_spft.MARSDistance(None, radius, axis=[0, 1, 2])):
        out = ops.convert_to_numpy(c(ops.convert_to_tensor(w)))
        assert np.all(np.isfinite(out)), (type(c).__name__, scale, radius)


def test_diverging_run_stops_before_checkpointing(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="a"), keras.layers.Dense(1, name="h")])
    keras_spft.wrap_pretrained(model, radius=1e6, head_radius=1e6)
    model.compile(optimizer=keras.optimizers.SGD(1e6), loss="mse")  # diverges
    ckpt = tmp_path / "last.keras"
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32") * 100
    y = np.ones((64, 1), "float32") * 1e3
    # A checkpoint after every batch: Keras' own TerminateOnNaN would let it
    # write the broken weights at the failing batch; this one raises first.
    with pytest.raises(FloatingPointError, match=r"loss became (nan|inf) at epoch 0, batch [1-9]"):
        model.fit(x, y, batch_size=4, epochs=3, verbose=0,
                  callbacks=[keras_spft.TerminateOnNonFinite(),
                             keras.callbacks.ModelCheckpoint(ckpt, save_freq=1)])
    assert ckpt.exists()  # the batches before the failing one were saved ...
    saved = keras.models.load_model(ckpt)
    for v in saved.weights:  # ... and only finite weights were
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(v))), v.path


def test_weights_gone_nan_behind_a_finite_loss_stop_at_that_batch(tmp_path):
    """A weight turned NaN while the reported loss stays finite: with
    check_weights="batch" the guard stops at that batch, before a per-batch
    checkpoint writes it."""
    class Poison(keras.callbacks.Callback):   # runs before the guard, after batch 2's loss is logged
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                k = self.model.get_layer("a").kernel
                k.assign(keras.ops.full(k.shape, float("nan")))

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="a"), keras.layers.Dense(1, name="h")])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    ckpt = tmp_path / "last.weights.h5"
    x, y = np.ones((32, 4), "float32"), np.ones((32, 1), "float32")
    with pytest.raises(FloatingPointError, match=r"weights became non-finite at epoch 0, batch 2 \(the loss, "
                                                  r"[0-9.e+-]+, did not show it\): .*a/kernel"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[Poison(), keras_spft.TerminateOnNonFinite(check_weights="batch"),
                             keras.callbacks.ModelCheckpoint(ckpt, save_weights_only=True, save_freq=1)])
    model.load_weights(ckpt)   # the last checkpoint, from batch 1, is finite
    assert all(np.all(np.isfinite(keras.ops.convert_to_numpy(v))) for v in model.weights)
    with pytest.raises(ValueError, match="check_weights must be True, False or 'batch'"):
        keras_spft.TerminateOnNonFinite(check_weights="epoch")


KILLED_RUN = """
import os, sys
import numpy as np, keras, keras_spft
out, kill = sys.argv[1], sys.argv[2] == "kill"
keras.utils.set_random_seed(0 if kill else 1)  # the restart's fresh weights and anchors differ
base = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="c"),
                         keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(6, name="fc")], name="base")
model = keras.Sequential([keras.Input((8, 8, 3)), base, keras.layers.Dense(3, name="head")])
report = keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
if kill:
    np.savez(os.path.join(out, "anchors.npz"), **{w.path: keras.ops.convert_to_numpy(w.obj.anchor)
                                                  for w in report.wrapped if w.obj.anchor is not None})
model.compile(optimizer=keras.optimizers.Adam(0.05),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
if not kill:  # so only a restore can bring the original anchors back
    saved = np.load(os.path.join(out, "anchors.npz"))
    assert all(not np.array_equal(keras.ops.convert_to_numpy(w.obj.anchor), saved[w.path])
               for w in report.wrapped if w.obj.anchor is not None)
class Kill(keras.callbacks.Callback):
    first_epoch = None
    def on_train_batch_end(self, batch, logs=None):
        if kill and self.params and getattr(self, "_epoch", 0) == 1 and batch == 2:
            os._exit(17)  # killed mid-epoch
    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if Kill.first_epoch is None:
            Kill.first_epoch = epoch
x = np.random.default_rng(0).random((32, 8, 8, 3)).astype("float32")
y = np.arange(32) % 3
backup = keras.callbacks.BackupAndRestore(os.path.join(out, "backup"), save_freq=1)
model.fit(x, y, batch_size=4, epochs=3, verbose=0, callbacks=[backup, Kill()])
assert Kill.first_epoch == 1, Kill.first_epoch  # resumed in the killed epoch, not from scratch
saved = np.load(os.path.join(out, "anchors.npz"))
for w in report.wrapped:
    if w.obj.anchor is None:
        continue
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(w.obj.anchor), saved[w.path])
    var = next(v for v in model.trainable_variables if v.constraint is w.obj)
    d = np.abs(keras.ops.convert_to_numpy(var).astype("float64") - saved[w.path]).sum(axis=tuple(range(len(var.shape) - 1)))
    assert d.max() <= 0.05 * (1 + 1e-5) + 1e-6, d.max()
print("RESUMED OK")
"""


def test_killed_run_resumes_with_the_same_anchors(tmp_path):
    """BackupAndRestore: a run killed mid-epoch and restarted (re-wrapped at
    its own fresh start) ends with the original anchors and within bounds."""
    script = textwrap.dedent(KILLED_RUN)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    first = subprocess.run([sys.executable, "-c", script, str(tmp_path), "kill"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 17, first.stderr[-3000:]
    assert (tmp_path / "backup").exists()
    second = subprocess.run([sys.executable, "-c", script, str(tmp_path), "resume"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "RESUMED OK" in second.stdout, second.stderr[-3000:]


def test_the_default_guard_finds_weights_gone_nan_by_the_end_of_the_epoch():
    """The loss of the last batch is computed before its update: weights that
    update makes NaN are found by the end-of-epoch scan (check_weights=True,
    the default), naming the first ten and how many more."""
    class Poison(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 7:
                for i in range(12):
                    k = self.model.get_layer(f"d{i}").kernel
                    k.assign(keras.ops.full(k.shape, float("nan")))

    model = keras.Sequential([keras.Input((4,))] + [keras.layers.Dense(4, name=f"d{i}") for i in range(12)]
                             + [keras.layers.Dense(1, name="h")])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    x, y = np.ones((32, 4), "float32"), np.ones((32, 1), "float32")
    with pytest.raises(FloatingPointError, match=r"non-finite by the end of epoch 0: \S*d0/kernel, .*d9/kernel"
                                                  r" and \d+ more\."):
        model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[Poison(), keras_spft.TerminateOnNonFinite()])
