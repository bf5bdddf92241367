"""Saving: anchors are binary weights; load_model/load_weights restore them
bit-identically and the constraints stay active."""

import os
import zipfile

import numpy as np
import pytest
import keras

import keras_spft
from tests.core.helpers import assert_within_bound, to_np
from tests.core.models import small_cnn
from tests.core.test_training import BoundChecker, _constrained, _data


def _anchors(model):
    """Anchors by position of their variable in model.trainable_variables
    (variable paths differ between a model and its reloaded copy)."""
    out = {}
    for i, v in enumerate(model.trainable_variables):
        obj = v.constraint or v.regularizer
        if obj is not None and obj.anchor is not None:
            out[i] = to_np(obj.anchor)
    return out


def _compile(model):
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


@pytest.mark.parametrize("method", ["mars-pgm-exact", "l2-pgm"])
def test_keras_file_round_trip(tmp_path, method):
    keras.utils.set_random_seed(0)
    model = small_cnn()
    plain = tmp_path / "plain.keras"
    model.save(plain)
    keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5, method=method, relative=method == "l2-pgm")
    _compile(model)
    x, y = _data(16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)

    with zipfile.ZipFile(path) as z:
        config = z.read("config.json").decode()
    assert "keras_spft>" in config
    assert len(config) < 4 * len(zipfile.ZipFile(plain).read("config.json")), "anchors leaked into JSON"

    loaded = keras.models.load_model(path)
    a, b = _anchors(model), _anchors(loaded)
    assert a.keys() == b.keys() and len(a) == 4
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k])
    for v, w in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(to_np(v), to_np(w))
    # still active: keep training the loaded model, the bound holds around
    # the ORIGINAL anchors and rows move
    checker = BoundChecker()
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[checker])
    assert checker.checks == 2
    for var, c in _constrained(loaded):
        assert_within_bound(c, var)


def test_keras_file_size_is_about_twice_the_plain_one(tmp_path):
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNet(alpha=0.25, include_top=False, weights=None,
                                        input_shape=(32, 32, 3), pooling="avg")
    model = keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.Dense(5)])
    model.save(tmp_path / "plain.keras")
    keras_spft.wrap_pretrained(model, radius=1.0, head_radius=1.0)
    model.save(tmp_path / "wrapped.keras")
    plain = os.path.getsize(tmp_path / "plain.keras")
    wrapped = os.path.getsize(tmp_path / "wrapped.keras")
    assert 1.5 < wrapped / plain < 2.2, (plain, wrapped)


def test_penalties_survive_save_and_load(tmp_path):
    keras.utils.set_random_seed(1)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, method="mars-sp", strength=0.3, head_strength=0.1)
    model.layers[0].get_layer("c2").kernel.assign(to_np(model.layers[0].get_layer("c2").kernel) + 0.2)
    model.save(tmp_path / "sp.keras")
    loaded = keras.models.load_model(tmp_path / "sp.keras")
    want = sum(float(to_np(l)) for l in model.losses)
    got = sum(float(to_np(l)) for l in loaded.losses)
    assert want > 0 and got == pytest.approx(want, rel=1e-6)
    np.testing.assert_array_equal(
        to_np(loaded.layers[0].get_layer("c2").kernel_regularizer.anchor),
        to_np(model.layers[0].get_layer("c2").kernel_regularizer.anchor))


def test_save_weights_resume_keeps_the_original_anchors(tmp_path):
    keras.utils.set_random_seed(2)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
    original = _anchors(model)
    _compile(model)
    x, y = _data(16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    ckpt = tmp_path / "ckpt.weights.h5"
    model.save_weights(ckpt)

    # A new process would rebuild the model: here with different initial
    # weights, wrapped at those (wrong) values, then resumed from the file.
    keras.utils.set_random_seed(99)
    resumed = small_cnn()
    keras_spft.wrap_pretrained(resumed, radius=0.05, head_radius=0.5)
    assert any(not np.array_equal(original[k], v) for k, v in _anchors(resumed).items())
    resumed.load_weights(ckpt)
    for k, v in _anchors(resumed).items():
        np.testing.assert_array_equal(original[k], v)
    for v, w in zip(model.weights, resumed.weights):
        np.testing.assert_array_equal(to_np(v), to_np(w))


def test_load_weights_across_wrap_options_says_what_it_restores(tmp_path):
    keras.utils.set_random_seed(5)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=0.05)          # head left free: no object, no state
    original = _anchors(model)
    model.save_weights(tmp_path / "w.weights.h5")

    # A head bound given now has nothing to restore: no error (it claimed the
    # file came from an unwrapped model and advised re-anchoring).
    resumed = small_cnn()
    keras_spft.wrap_pretrained(resumed, radius=0.05, head_radius=0.5)
    resumed.load_weights(tmp_path / "w.weights.h5")
    assert {k: v.tolist() for k, v in _anchors(resumed).items()} == {k: v.tolist() for k, v in original.items()}
    assert float(to_np(resumed.layers[-1].kernel.constraint.radius)) == 0.5

    # Another fixed radius: the file's is restored, with a warning saying how
    # to train with the new one; wrapping again after loading does that.
    other = small_cnn()
    report = keras_spft.wrap_pretrained(other, radius=0.2)
    with pytest.warns(UserWarning, match=r"the weights file's radius \(0\.05\) replaces 0\.2 on the kernels "
                                         r"wrapped with 0\.2 .*call `wrap_pretrained` again after loading") as caught:
        other.load_weights(tmp_path / "w.weights.h5")
    assert {w.filename for w in caught if "replaces" in str(w.message)} == {__file__}   # the user's line
    assert float(to_np(report["c1"].radius)) == pytest.approx(0.05)
    report = keras_spft.wrap_pretrained(other, radius=0.2)
    assert float(to_np(report["c1"].radius)) == pytest.approx(0.2)
    np.testing.assert_array_equal(to_np(report["c1"].anchor), original[0])

    # Radii worked out from the anchor (relative: the file's come from the
    # loaded anchors), and the same radius up to rounding: nothing to say.
    keras.utils.set_random_seed(6)
    rel = small_cnn()
    keras_spft.wrap_pretrained(rel, radius=0.05, relative=True, head_radius=0.5)
    rel.save_weights(tmp_path / "rel.weights.h5")
    rel.save(tmp_path / "rel.keras")
    again = small_cnn()
    keras_spft.wrap_pretrained(again, radius=0.05, relative=True, head_radius=0.5 * (1 + 1e-8))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        again.load_weights(tmp_path / "rel.weights.h5")
        keras.models.load_model(tmp_path / "rel.keras")
    np.testing.assert_array_equal(to_np(again.layers[0].get_layer("c1").kernel.constraint.radius),
                                  to_np(rel.layers[0].get_layer("c1").kernel.constraint.radius))
    # The same for a relative Frobenius radius, a scalar (it warned per
    # kernel, advising a re-wrap that gives the file's radius again).
    l2 = small_cnn()
    keras_spft.wrap_pretrained(l2, method="l2-pgm", radius=0.05, relative=True)
    l2.save_weights(tmp_path / "l2rel.weights.h5")
    again = small_cnn()
    report = keras_spft.wrap_pretrained(again, method="l2-pgm", radius=0.05, relative=True)
    assert float(to_np(report["c1"].radius)) != pytest.approx(float(to_np(l2.layers[0].get_layer("c1").kernel.constraint.radius)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        again.load_weights(tmp_path / "l2rel.weights.h5")
    assert float(to_np(report["c1"].radius)) == float(to_np(l2.layers[0].get_layer("c1").kernel.constraint.radius))

    # A constraint's file into a penalty: the error names both causes.
    sp = small_cnn()
    keras_spft.wrap_pretrained(sp, method="l2-sp", strength=0.01)
    with pytest.raises(ValueError, match=r"L2SP\(base/c1/kernel\): the weights file has no keras-spft penalty "
                                         r"state.*not wrapped.*had a constraint \(l2-pgm, mars-pgm\)"):
        sp.load_weights(tmp_path / "w.weights.h5")


def test_loading_into_a_mismatched_wrapper_fails_loudly(tmp_path):
    keras.utils.set_random_seed(3)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
    model.save_weights(tmp_path / "w.weights.h5")
    other = small_cnn()
    keras_spft.wrap_pretrained(other, radius=0.05, head_radius=0.5, relative=True)
    # relative radii are per-row: the stored scalar radius cannot fill them
    with pytest.raises(ValueError, match=r"saved radius has shape \(\), expected \(1, 1, 1, 6\)"):
        other.load_weights(tmp_path / "w.weights.h5")


def test_a_mismatched_load_leaves_the_object_refusing(tmp_path):
    """The file's head was bound around zero (state: radius), this model's
    head is anchored (state: radius and anchor): the kernel is loaded, the
    anchor is not, so projecting would pull the loaded head towards a stale
    anchor. skip_mismatch=True only warns; training must still refuse."""
    keras.utils.set_random_seed(5)
    saved = small_cnn()
    keras_spft.wrap_pretrained(saved, radius=0.05, head_radius=0.5)
    saved.save_weights(tmp_path / "w.weights.h5")
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=0.05, head=[])
    model.load_weights(tmp_path / "w.weights.h5", skip_mismatch=True)
    head = model.get_layer("head").kernel
    np.testing.assert_array_equal(to_np(head), to_np(saved.get_layer("head").kernel))
    _compile(model)
    x, y = _data(8)
    with pytest.raises(Exception, match=r"head/kernel.*holds \['radius'\] but this object needs.*refuses"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    # A shape mismatch (per-row radii in this model, a scalar in the file)
    # refuses too, and assigns nothing: the anchors stay this model's.
    other = small_cnn()
    keras_spft.wrap_pretrained(other, radius=0.05, head_radius=0.5, relative=True)
    before = _anchors(other)
    other.load_weights(tmp_path / "w.weights.h5", skip_mismatch=True)
    for k, v in _anchors(other).items():
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(RuntimeError, match=r"saved radius has shape \(\), expected"):
        other.get_layer("base").get_layer("c1").kernel.constraint(other.get_layer("base").get_layer("c1").kernel)


def test_a_clone_saved_before_its_anchors_were_loaded_still_refuses(tmp_path):
    """clone_model rebuilds the constraints from their configs (placeholder
    anchors, and per-row radii of a head as ones): saving the clone must not
    turn the placeholders into loaded values, nor must a deep copy."""
    import copy

    keras.utils.set_random_seed(6)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
    head = model.get_layer("head")
    head.kernel.constraint = head.kernel_constraint = keras_spft.MARSDistance(
        None, np.array([0.1, 0.2, 0.3], "float32"))
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.save(tmp_path / "clone.keras")
    for copied in (keras.models.load_model(tmp_path / "clone.keras"), copy.deepcopy(clone)):
        c1 = copied.get_layer("base").get_layer("c1").kernel
        with pytest.raises(RuntimeError, match=r"base/c1/kernel.*(never been loaded|never loaded)"):
            c1.constraint(c1)
        k = copied.get_layer("head").kernel
        with pytest.raises(RuntimeError, match=r"per-row radius values were never loaded"):
            k.constraint(k)
    # A copy of the object itself says what it is (no file involved).
    c1 = clone.get_layer("base").get_layer("c1").kernel
    with pytest.raises(RuntimeError, match=r"base/c1/kernel\) was rebuilt from a config but its anchor was never"):
        copy.deepcopy(c1.constraint)(c1)
    # The wrapped original saves and loads as before (no placeholder flag).
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    k = loaded.get_layer("head").kernel
    np.testing.assert_array_equal(to_np(k.constraint.radius), np.float32([0.1, 0.2, 0.3]))
    assert_within_bound(k.constraint, k.constraint(k))


def test_weights_of_an_unwrapped_model_loaded_after_wrapping_are_refused(tmp_path):
    """Wrap, then load pre-trained weights saved without keras-spft: Keras
    writes the kernels, the anchors stay the wrap-time values. The error says
    so, and the constraints refuse to project rather than pull the loaded
    weights towards the stale anchors (skip_mismatch=True only warns)."""
    keras.utils.set_random_seed(4)
    pretrained = small_cnn()
    pretrained.save_weights(tmp_path / "pre.weights.h5")
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
    with pytest.raises(ValueError, match=r"no keras-spft constraint state for this kernel.*before `wrap_pretrained`"):
        model.load_weights(tmp_path / "pre.weights.h5")
    model.load_weights(tmp_path / "pre.weights.h5", skip_mismatch=True)
    _compile(model)
    x, y = _data(8)
    with pytest.raises(Exception, match="no keras-spft constraint state for this kernel"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"no keras-spft constraint state.*method='none'"):
        keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
    # The way out it names: unwrap, load, wrap again -> anchored at the file's weights.
    keras_spft.wrap_pretrained(model, method="none")
    model.load_weights(tmp_path / "pre.weights.h5")
    keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
    for k, v in _anchors(model).items():
        np.testing.assert_array_equal(v, to_np(pretrained.trainable_variables[k]))


def test_jax_warns_when_loaded_anchors_differ_from_compiled_ones(tmp_path):
    if keras.backend.backend() != "jax":
        pytest.skip("only the JAX compiled step captures anchors as constants")
    keras.utils.set_random_seed(4)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=0.05, head_radius=0.5)
    model.save_weights(tmp_path / "a.weights.h5")
    other = small_cnn()  # other initial weights, so other anchors
    keras_spft.wrap_pretrained(other, radius=0.05, head_radius=0.5)
    _compile(other)
    x, y = _data(8)
    other.fit(x, y, batch_size=8, epochs=1, verbose=0)
    with pytest.warns(RuntimeWarning, match="call `model.compile"):
        other.load_weights(tmp_path / "a.weights.h5")
    _compile(other)  # the documented remedy: the new anchors are then in force
    other.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for var, c in _constrained(other):
        assert_within_bound(c, var)


def test_a_penalty_run_resumed_by_backup_and_restore_trains_to_the_backup_anchors(tmp_path):
    """On JAX `fit` traces the loss for its shapes before BackupAndRestore
    loads the backup: that trace was taken for the compiled step, and the
    resume warned, once per kernel, that the old anchors stayed in force
    (they did not)."""
    import warnings

    keras.utils.set_random_seed(4)
    x, y = _data(16)

    def wrapped():
        model = small_cnn()
        keras_spft.wrap_pretrained(model, method="l2-sp", strength=1.0, head_strength=0.1)
        _compile(model)
        return model

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("interrupted")

    first = wrapped()
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        first.fit(x, y, batch_size=8, epochs=3, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(backup), Stop()])
    anchors = _anchors(first)
    assert anchors
    second = wrapped()   # other initial weights, so other anchors until the backup is loaded
    assert any(not np.array_equal(v, anchors[i]) for i, v in _anchors(second).items())
    with warnings.catch_warnings(record=True) as caught:   # (an "error" filter: Keras' loader catches it)
        warnings.simplefilter("always")
        second.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert not [w for w in caught if "compiled with the old ones" in str(w.message)]
    for i, v in _anchors(second).items():
        np.testing.assert_array_equal(v, anchors[i])


def test_a_legacy_hdf5_file_with_a_radius_optimizer_says_what_happened(tmp_path):
    """Keras' legacy .h5 loader builds the optimizer on no variables; the
    error said the model was not wrapped or its kernels frozen."""
    if keras.backend.backend() == "jax":
        pytest.skip("on JAX the legacy .h5 writer fails first: the optimizer state holds the anchors, all "
                    "named 'anchor' (h5py: dataset name already exists); documented in the guide")
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=1.0)
    model.compile(optimizer=keras_spft.RadiusOptimizer(keras.optimizers.Adam(1e-2)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "m.h5")
    with pytest.raises(ValueError, match=r"RadiusOptimizer: built on no variables at all\. Keras' legacy HDF5 "
                                         r"loader does this .*model\.save\('model\.keras'\)"):
        keras.models.load_model(tmp_path / "m.h5")
