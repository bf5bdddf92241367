"""wrap_pretrained: which object goes where, options and errors."""

import warnings

import numpy as np
import pytest
import keras
from keras import ops

import keras_spft
from tests.core.helpers import to_np
from tests.core.models import OUTPUT_AXES, all_kernel_types_model, small_cnn


def _key(w):
    name = w.path.split("/")[-1]
    return name if w.weight in ("kernel",) else f"{name}.{w.weight}"


def test_every_supported_layer_type_gets_the_right_rows():
    model = all_kernel_types_model()
    report = keras_spft.wrap_pretrained(model, radius=0.5, head_radius=1.0, batchnorm="gamma")
    keys = {_key(w): w for w in report.wrapped}
    assert set(keys) == set(OUTPUT_AXES)
    assert keys["head"].role == "head" and keys["head"].obj.anchor is None
    for key, w in keys.items():
        var = next(v for v in model.weights if v.constraint is w.obj)
        shape = tuple(var.shape)
        out_axes = OUTPUT_AXES[key]
        assert w.rows == int(np.prod([shape[a] for a in out_axes])), key
        # Push every element by +1 and project: each row (output unit) must end
        # exactly on its L1 sphere of radius r, whatever the layout.
        anchor = 0.0 if w.obj.anchor is None else to_np(w.obj.anchor)
        moved = to_np(w.obj(ops.convert_to_tensor(to_np(var) + 1.0))) - anchor
        summed = tuple(a for a in range(len(shape)) if a not in out_axes)
        per_row = np.abs(moved).sum(axis=summed) if summed else np.abs(moved)
        r = 1.0 if key == "head" else 0.5
        np.testing.assert_allclose(per_row, r, rtol=1e-5, err_msg=key)


def test_biases_batchnorm_beta_and_statistics_are_never_touched():
    model = all_kernel_types_model()
    for bn in (None, "gamma", "reference"):
        keras_spft.wrap_pretrained(model, radius=0.5, head_radius=1.0, batchnorm=bn)
        for v in model.weights:
            if v.name in ("bias", "beta", "moving_mean", "moving_variance"):
                assert v.constraint is None and v.regularizer is None, v.path
            if v.name == "gamma":
                assert (v.constraint is None) == (bn is None)


def test_batchnorm_reference_bounds_the_effective_scale():
    model = small_cnn()
    bn = model.layers[0].get_layer("bn1")
    bn.moving_variance.assign(np.array([0.25, 1, 4, 9, 16, 0.01], "float32"))
    report = keras_spft.wrap_pretrained(model, radius=0.1, head_radius=1.0, batchnorm="reference")
    c = report["bn1"]
    g0 = to_np(bn.gamma).copy()
    var = to_np(bn.moving_variance)
    new = to_np(c(ops.convert_to_tensor(g0 + 5.0)))
    eff = (new - g0) / np.sqrt(var + bn.epsilon)
    np.testing.assert_allclose(eff, 0.1, rtol=1e-5)


def test_wrapping_again_keeps_the_pre_trained_variance_of_batchnorm_reference(tmp_path):
    """Fine-tuning moves the moving variance: wrapping again (say, for
    another radius) must scale by the pre-trained one, also after a save."""
    model = small_cnn()
    bn = model.layers[0].get_layer("bn1")
    var0 = np.array([0.25, 1, 4, 9, 16, 0.01], "float32")
    bn.moving_variance.assign(var0)
    keras_spft.wrap_pretrained(model, radius=0.1, head_radius=1.0, batchnorm="reference")
    bn.moving_variance.assign(var0 * 3.0)   # as fine-tuning would move it
    want = 0.2 * np.sqrt(var0.astype("float64") + bn.epsilon)
    report = keras_spft.wrap_pretrained(model, radius=0.2, head_radius=1.0, batchnorm="reference")
    np.testing.assert_allclose(to_np(report["bn1"].radius), want, rtol=1e-6)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    report = keras_spft.wrap_pretrained(loaded, radius=0.2, head_radius=1.0, batchnorm="reference")
    np.testing.assert_allclose(to_np(report["bn1"].radius), want, rtol=1e-6)
    # Weights loaded into a model wrapped with another radius, then wrapped
    # again (as the radius warning advises): the file's scale comes with them.
    model.save_weights(tmp_path / "m.weights.h5")
    other = small_cnn()
    other.layers[0].get_layer("bn1").moving_variance.assign(var0)
    keras_spft.wrap_pretrained(other, radius=0.3, head_radius=1.0, batchnorm="reference")
    other.load_weights(tmp_path / "m.weights.h5")
    report = keras_spft.wrap_pretrained(other, radius=0.1, head_radius=1.0, batchnorm="reference")
    np.testing.assert_allclose(to_np(report["bn1"].radius), want / 2, rtol=1e-6)
    # A file saved before the scale was recorded loads; wrapping again then
    # says it scales by the current variance.
    c = report["bn1"]
    c.load_own_variables({"radius": to_np(c.radius), "anchor": to_np(c.anchor)})
    assert c.batchnorm_reference is None
    with pytest.warns(UserWarning, match=r"'base/bn1'.*saved by keras-spft before 2026-11-28.*current one"):
        keras_spft.wrap_pretrained(other, radius=0.1, head_radius=1.0, batchnorm="reference")
    # ... and a newer file loads into it again, scale included.
    c = other.layers[0].get_layer("bn1").gamma.constraint
    c.load_own_variables({"radius": to_np(c.radius), "anchor": to_np(c.anchor)})
    c.load_own_variables({"radius": to_np(c.radius), "anchor": to_np(c.anchor),
                          "batchnorm_reference": np.float32(0.25)})
    assert c.batchnorm_reference == 0.25 and not c._bn_reference_lost
    # Wrapped with batchnorm="gamma" before, nothing saved: no word of files.
    fresh = small_cnn()
    keras_spft.wrap_pretrained(fresh, radius=0.1, head_radius=1.0, batchnorm="gamma", relative=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        keras_spft.wrap_pretrained(fresh, radius=0.1, head_radius=1.0, batchnorm="reference")


def test_default_head_is_what_follows_the_nested_base():
    model = small_cnn()
    report = keras_spft.wrap_pretrained(model, radius=1.0, head_radius=2.0)
    roles = {w.path: w.role for w in report.wrapped}
    assert roles == {"base/c1": "backbone", "base/dw": "backbone", "base/c2": "backbone",
                     "base/fc": "backbone", "head": "head"}
    # flat model: the last kernel layer is the head
    flat = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, name="a"), keras.layers.Dense(2, name="b")])
    report = keras_spft.wrap_pretrained(flat, radius=1.0, head_radius=2.0)
    assert {w.path: w.role for w in report.wrapped} == {"a": "backbone", "b": "head"}
    # flat, several outputs: which are new heads cannot be told from the
    # graph (a features output, a head with a skip connection), so it warns
    i = keras.Input((8,))
    h = keras.layers.Dense(16, name="body")(i)
    two = keras.Model(i, [keras.layers.Dense(3, name="cls")(h), keras.layers.Dense(1, name="reg")(h)])
    with pytest.warns(UserWarning, match=r"has 2 outputs and no nested pre-trained model: only its last kernel "
                                         r"layer 'reg' is taken as the new head.*head=\[\.\.\.\]"):
        report = keras_spft.wrap_pretrained(two, radius=1.0, head_radius=2.0)
    assert {w.path: w.role for w in report.wrapped} == {"body": "backbone", "cls": "backbone", "reg": "head"}
    report = keras_spft.wrap_pretrained(two, radius=1.0, head=["cls", "reg"], head_radius=2.0)
    assert {w.path: w.role for w in report.wrapped} == {"body": "backbone", "cls": "head", "reg": "head"}
    # explicit head, by name or path
    report = keras_spft.wrap_pretrained(model, radius=1.0, head=["base/fc", "head"], head_radius=2.0)
    assert {w.path for w in report.wrapped if w.role == "head"} == {"base/fc", "head"}
    # no head: everything anchored
    report = keras_spft.wrap_pretrained(model, radius=1.0, head=[])
    assert all(w.role == "backbone" and w.obj.anchor is not None for w in report.wrapped)


def test_head_left_free_is_reported():
    model = small_cnn()
    report = keras_spft.wrap_pretrained(model, radius=1.0)
    assert model.layers[-1].kernel.constraint is None
    assert any(s.path == "head" and "head left free" in s.reason for s in report.skipped)


def test_radius_forms():
    model = small_cnn()
    report = keras_spft.wrap_pretrained(model, radius={"c1": 0.5, "base/dw": 0.25, "*": 2.0}, head_radius=3.0)
    got = {w.path: float(to_np(w.obj.radius)) for w in report.wrapped}
    assert got == {"base/c1": 0.5, "base/dw": 0.25, "base/c2": 2.0, "base/fc": 2.0, "head": 3.0}
    report = keras_spft.wrap_pretrained(
        model, radius=lambda layer: None if layer.name == "fc" else 1.5, head_radius=3.0)
    assert model.layers[0].get_layer("fc").kernel.constraint is None
    assert any(s.path == "base/fc" and "returned None" in s.reason for s in report.skipped)
    with pytest.raises(ValueError, match="no entry for layer 'base/dw'"):
        keras_spft.wrap_pretrained(model, radius={"c1": 0.5}, head_radius=3.0)
    with pytest.raises(ValueError, match="`radius` names layer 'cl' which does not exist"):
        keras_spft.wrap_pretrained(model, radius={"cl": 0.5, "*": 1.0})


def test_relative_radius_per_row():
    model = small_cnn()
    c2 = model.layers[0].get_layer("c2")
    report = keras_spft.wrap_pretrained(model, radius=0.05, relative=True, head_radius=3.0)
    k0 = to_np(c2.kernel)
    np.testing.assert_allclose(to_np(report["c2"].radius).reshape(-1), 0.05 * np.abs(k0).sum(axis=(0, 1, 2)), rtol=1e-6)
    assert "row norm" in str(report)


def test_report_prints_a_table():
    model = small_cnn()
    report = keras_spft.wrap_pretrained(model, radius=1.0, head_radius=2.0, method="mars-pgm-exact")
    text = str(report)
    assert text.splitlines()[0].startswith("mars-pgm-exact: 5 weights wrapped (backbone 4, head 1)")
    for col in ("layer", "kind", "rows", "radius/strength", "params"):
        assert col in text.splitlines()[1]
    assert "base/dw" in text and "DepthwiseConv2D" in text and "BatchNorm: gamma left free" in text
    n = sum(int(np.prod(v.shape)) for v in model.weights if v.name == "kernel")
    assert report.params == n
    assert report.anchor_bytes == 4 * (n - int(np.prod(model.layers[-1].kernel.shape)))


def test_rewrapping_never_reanchors():
    model = small_cnn()
    c1 = model.layers[0].get_layer("c1")
    original = to_np(c1.kernel).copy()
    keras_spft.wrap_pretrained(model, radius=1.0, head_radius=2.0)
    c1.kernel.assign(original + 0.3)  # "fine-tuned"
    report = keras_spft.wrap_pretrained(model, method="l2-pgm", radius=0.5, head_radius=2.0)
    np.testing.assert_array_equal(to_np(report["c1"].anchor), original)
    assert "kept existing anchor" in str(report)
    report = keras_spft.wrap_pretrained(model, method="none")
    assert all(v.constraint is None and v.regularizer is None for v in model.weights)


def test_a_rewrap_that_would_drop_anchors_is_refused_unless_asked():
    # Leaving an anchored weight free in a later call (BatchNorm under the
    # default batchnorm=None, exclude=, a callable's None, or naming it head)
    # dropped its anchor without a word, and the call after that anchored it
    # at its fine-tuned value.
    model = small_cnn()
    base = model.layers[0]
    gamma0, fc0 = to_np(base.get_layer("bn1").gamma).copy(), to_np(base.get_layer("fc").kernel).copy()
    keras_spft.wrap_pretrained(model, radius=1.0, head_radius=2.0, batchnorm="gamma")
    # Before training, a weight still equals its anchor: trying other
    # options on it loses nothing (a later call anchors it at the same values).
    keras_spft.wrap_pretrained(model, radius=1.0, head_radius=2.0, exclude=["fc"])
    keras_spft.wrap_pretrained(model, radius=1.0, head_radius=2.0, batchnorm="gamma")
    for name, attr in (("bn1", "gamma"), ("fc", "kernel"), ("c2", "kernel")):   # "fine-tuned"
        var = getattr(base.get_layer(name), attr)
        var.assign(to_np(var) + 0.01)
    before = {id(v): v.constraint for v in model.weights}
    for kwargs, named in [({}, r"base/bn1/gamma \(BatchNorm: gamma left free"),
                          ({"batchnorm": "gamma", "exclude": ["fc"]}, r"base/fc/kernel \(excluded by the user\)"),
                          ({"batchnorm": "gamma", "radius": lambda l: None if l.name == "c2" else 1.0},
                           r"base/c2/kernel \(the radius callable returned None\)"),
                          ({"batchnorm": "gamma", "head": ["fc", "head"]}, r"base/fc/kernel \(now head")]:
        with pytest.raises(ValueError, match=r"would remove the anchors an earlier wrap_pretrained call set on "
                                             rf"1 weight\(s\) that have moved from them: {named}.*drop_anchors=True"):
            keras_spft.wrap_pretrained(model, **{"radius": 0.5, "head_radius": 2.0, **kwargs})
        assert {id(v): v.constraint for v in model.weights} == before   # nothing changed
    # Asked for, the anchors go; the earlier call's options keep them.
    report = keras_spft.wrap_pretrained(model, radius=0.5, head_radius=2.0, batchnorm="gamma")
    np.testing.assert_array_equal(to_np(report["bn1"].anchor), gamma0)
    report = keras_spft.wrap_pretrained(model, radius=0.5, head_radius=2.0, exclude=["fc"], drop_anchors=True)
    assert base.get_layer("fc").kernel.constraint is None and base.get_layer("bn1").gamma.constraint is None
    report = keras_spft.wrap_pretrained(model, radius=0.5, head_radius=2.0)   # anchors fc afresh, as asked
    np.testing.assert_array_equal(to_np(report["fc"].anchor), to_np(base.get_layer("fc").kernel))
    assert not np.array_equal(to_np(report["fc"].anchor), fc0)
    keras_spft.wrap_pretrained(model, method="none")   # removes everything without drop_anchors
    with pytest.raises(ValueError, match="`drop_anchors` must be True or False"):
        keras_spft.wrap_pretrained(model, radius=0.5, drop_anchors="yes")


def test_applications_models_wrap(app_models):
    for name, model, expected in app_models:
        report = keras_spft.wrap_pretrained(model, radius=5.0, head_radius=5.0)
        kernels = [v for v in model.trainable_weights if v.name in ("kernel", "depthwise_kernel", "pointwise_kernel")]
        assert len(report.wrapped) == len(kernels) == expected, name
        assert all(v.constraint is not None for v in kernels), name
        assert [w.role for w in report.wrapped].count("head") == 1


@pytest.fixture(scope="module")
def app_models():
    out = []
    apps = [("mobilenet", keras.applications.MobileNet, dict(alpha=0.25), 28),
            ("resnet50", keras.applications.ResNet50, {}, 54)]
    if keras.backend.backend() == "tensorflow":
        # Which kernels are wrapped does not depend on the backend, and
        # building these two takes 20 s on JAX: TensorFlow's run covers them.
        apps += [("efficientnetb0", keras.applications.EfficientNetB0, {}, 82),
                 ("resnet101", keras.applications.ResNet101, {}, 105)]
    for name, fn, kw, n in apps:
        base = fn(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg", **kw)
        model = keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.Dense(7)])
        out.append((name, model, n))
    return out


# -- errors -------------------------------------------------------------------

def test_rewrapping_a_clone_whose_anchors_were_never_loaded_is_refused():
    # clone_model rebuilds the constraints from their configs: the anchors
    # are placeholders until loaded, and must not become the new anchors.
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=1.0, head_radius=2.0)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    with pytest.raises(ValueError, match="layer 'base/c1'.*anchor was never loaded"):
        keras_spft.wrap_pretrained(clone, radius=0.5, head_radius=2.0)


def test_a_bare_layer_name_selects_every_layer_of_that_name():
    def base(name):
        inp = keras.Input((3,))
        body = keras.layers.Dense(5, name="body")(inp)
        return keras.Model(inp, keras.layers.Dense(4, name="fc")(body), name=name)
    inp = keras.Input((3,))
    out = keras.layers.Dense(2, name="head")(keras.layers.Concatenate()([base("a")(inp), base("b")(inp)]))
    model = keras.Model(inp, out)
    report = keras_spft.wrap_pretrained(model, radius=1.0, exclude=["fc"])
    assert {s.path for s in report.skipped if "excluded" in s.reason} == {"a/fc", "b/fc"}
    report = keras_spft.wrap_pretrained(model, radius=1.0, head=["fc"], head_radius=3.0)
    assert {w.path for w in report.wrapped if w.role == "head"} == {"a/fc", "b/fc"}


def test_a_nested_model_name_selects_every_layer_inside_it():
    inp = keras.Input((3,))
    base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5, name="d1"),
                             keras.layers.Dense(4, name="d2")], name="base")
    classifier = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, name="h1"),
                                   keras.layers.Dense(2, name="h2")], name="classifier")
    model = keras.Model(inp, classifier(base(inp)))
    report = keras_spft.wrap_pretrained(model, radius=0.5, head=["classifier"], head_radius=3.0)
    roles = {w.path: (w.role, w.shown) for w in report.wrapped}
    assert roles == {"base/d1": ("backbone", "0.5"), "base/d2": ("backbone", "0.5"),
                     "classifier/h1": ("head", "3"), "classifier/h2": ("head", "3")}
    assert report["h1"].anchor is None   # bounded around zero, not around its random start
    report = keras_spft.wrap_pretrained(model, radius={"base": 9.0, "d2": 2.0, "*": 0.01}, head=[])
    assert {w.path: w.shown for w in report.wrapped} == {
        "base/d1": "9", "base/d2": "2", "classifier/h1": "0.01", "classifier/h2": "0.01"}
    report = keras_spft.wrap_pretrained(model, radius=0.5, exclude=["base"], head=[])
    assert [w.path for w in report.wrapped] == ["classifier/h1", "classifier/h2"]
    assert model.get_layer("base").get_layer("d1").kernel.constraint is None
    assert {s.path for s in report.skipped if "excluded" in s.reason} >= {"base/d1", "base/d2"}


def test_errors_name_the_option_or_layer():
    model = small_cnn()
    with pytest.raises(ValueError, match="unknown method 'mars'"):
        keras_spft.wrap_pretrained(model, radius=1.0, method="mars")
    with pytest.raises(ValueError, match="layer 'base/c1'.*radius.*positive and finite"):
        keras_spft.wrap_pretrained(model, radius={"c1": -1.0, "*": 1.0})
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive and finite"):
            keras_spft.wrap_pretrained(model, radius=bad)
    with pytest.raises(ValueError, match="head_radius"):
        keras_spft.wrap_pretrained(model, radius=1.0, head_radius=-2.0)
    with pytest.raises(ValueError, match="head: layer 'classifier' does not exist"):
        keras_spft.wrap_pretrained(model, radius=1.0, head="classifier")
    with pytest.raises(ValueError, match="exclude: layer 'nope' does not exist"):
        keras_spft.wrap_pretrained(model, radius=1.0, exclude=["nope"])
    with pytest.raises(ValueError, match="needs `radius=`"):
        keras_spft.wrap_pretrained(model)
    with pytest.raises(ValueError, match="pass `strength=`"):
        keras_spft.wrap_pretrained(model, radius=1.0, method="l2-sp")
    with pytest.raises(ValueError, match=r"'mars-pgm' is a constraint: pass `radius=`/`head_radius=`, not `strength="):
        keras_spft.wrap_pretrained(model, radius=1.0, strength=0.1)
    with pytest.raises(ValueError, match=r"`relative=True` applies to PGM radii only"):
        keras_spft.wrap_pretrained(model, method="l2-sp", strength=0.1, relative=True)
    with pytest.raises(ValueError, match="applies to mars-pgm only"):
        keras_spft.wrap_pretrained(model, radius=1.0, method="l2-pgm", projection="exact")
    with pytest.raises(ValueError, match="unknown batchnorm option"):
        keras_spft.wrap_pretrained(model, radius=1.0, batchnorm="all")
    with pytest.raises(ValueError, match=r"wrap_pretrained: `relative` must be True or False, got 'no'"):
        keras_spft.wrap_pretrained(model, radius=1.0, relative="no")
    only_head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no eligible layer"):
        keras_spft.wrap_pretrained(only_head, radius=1.0)
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        keras_spft.wrap_pretrained(unbuilt, radius=1.0)
    with pytest.raises(ValueError, match=r"wrap_pretrained takes a Keras model, got Dense 'fc': wrap the model"):
        keras_spft.wrap_pretrained(model.layers[0].get_layer("fc"), radius=1.0)


def test_lora_layers_are_refused_with_a_reason():
    model = small_cnn()
    model.layers[0].get_layer("fc").enable_lora(2)
    with pytest.raises(ValueError, match="layer 'fc' has LoRA enabled"):
        keras_spft.wrap_pretrained(model, radius=1.0)
    report = keras_spft.wrap_pretrained(model, radius=1.0, exclude=["fc"])
    assert any(s.path == "base/fc" and "excluded" in s.reason for s in report.skipped)
    # and once wrapped, Keras itself refuses LoRA on a constrained layer
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=1.0)
    with pytest.raises(ValueError, match="constraint"):
        model.layers[0].get_layer("fc").enable_lora(2)
    # A penalty: Keras accepts LoRA and hands the factors the kernel's
    # regularizer; the error says so (it only named two shapes).
    model = small_cnn()
    keras_spft.wrap_pretrained(model, method="l2-sp", strength=0.1)
    model.layers[0].get_layer("fc").enable_lora(2)
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match=r"L2SP\(base/fc/kernel\).*anchor has shape.*LoRA enabled after wrapping"):
        model.fit(np.zeros((2,) + tuple(model.input_shape[1:]), "float32"), np.zeros((2, 3), "float32"), verbose=0)


def test_foreign_constraint_is_not_replaced():
    model = small_cnn()
    fc = model.layers[0].get_layer("fc")
    fc.kernel.constraint = fc.kernel_constraint = keras.constraints.MaxNorm(2.0)
    with pytest.raises(ValueError, match="layer 'base/fc'.*already has a constraint MaxNorm"):
        keras_spft.wrap_pretrained(model, radius=1.0)


def test_after_a_call_the_objects_are_exactly_those_reported():
    model = all_kernel_types_model()
    keras_spft.wrap_pretrained(model, radius=0.5, head_radius=1.0, batchnorm="gamma")
    report = keras_spft.wrap_pretrained(model, radius=0.5, head_radius=1.0, exclude=["dense"])
    attached = {id(v.constraint) for v in model.weights if v.constraint is not None}
    assert attached == {id(w.obj) for w in report.wrapped}
    gamma = next(v for v in model.weights if v.name == "gamma")
    assert gamma.constraint is None
    assert model.get_layer("base").get_layer("dense").kernel.constraint is None


def test_wrapping_again_after_compiling_takes_effect_at_the_next_fit():
    from tests.core.helpers import assert_within_bound

    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius=1.0, head_radius=3.0)
    model.compile(optimizer=keras.optimizers.Adam(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 12, 12, 3)).astype("float32"), rng.integers(0, 3, 16)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    report = keras_spft.wrap_pretrained(model, radius=0.01, head_radius=3.0)   # no compile in between
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    farthest = max(float(np.max(assert_within_bound(w.obj, w.obj and model.get_layer("base").get_layer(w.path.split("/")[-1]).kernel)))
                   for w in report.wrapped if w.role == "backbone")
    assert 0.009 < farthest <= 0.01 * (1 + 1e-5)


def test_wrapping_again_rebinds_a_built_radius_optimizer():
    """Re-wrapping mid-training (here: another head radius) goes on with the
    same optimizer: its radius state follows the new constraints, the radii
    go on from their learned values, and the inner Adam keeps its moments."""
    from tests.core.helpers import assert_within_bound

    keras.utils.set_random_seed(0)
    model = small_cnn()
    keras_spft.wrap_pretrained(model, radius="learned", head_radius=3.0)
    opt = keras_spft.RadiusOptimizer(keras.optimizers.Adam(1e-2))
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 12, 12, 3)).astype("float32"), rng.integers(0, 3, 32)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    before = keras_spft.learned_radii(model)
    n_vars, inner_iterations = len(opt.variables), int(to_np(opt.inner_optimizer.iterations))
    report = keras_spft.wrap_pretrained(model, radius="learned", head_radius=0.5)
    assert len(opt.variables) == n_vars and keras_spft.learned_radii(model) == before
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    after = keras_spft.learned_radii(model)
    assert after != before                                         # still learning, the new radii
    assert int(to_np(opt.inner_optimizer.iterations)) == inner_iterations + 4
    for w in report.wrapped:
        layer = model.get_layer(w.path) if "/" not in w.path else model.get_layer("base").get_layer(w.path.split("/")[-1])
        assert_within_bound(w.obj, layer.kernel)                  # the head within its new 0.5
    for method, kw in (("l2-sp", {"strength": 0.1}), ("none", {})):   # no constraint left: steps as Adam
        keras_spft.wrap_pretrained(model, method=method, **kw)
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    keras_spft.wrap_pretrained(model, radius=0.01, head_radius=0.5)    # and back
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    with pytest.raises(ValueError, match="constraints changed after this optimizer was built"):
        model.get_layer("head").kernel.constraint = keras_spft.MARSDistance(None, 1.0, name="manual")
        opt.apply([keras.ops.zeros(v.shape) for v in model.trainable_variables], model.trainable_variables)
    # The documented way for a constraint set by hand: rebind() and compile
    # again (TensorFlow and JAX kept projecting onto the compiled step's
    # constraint, 0.5, without the compile; a review found the docs silent).
    head = model.get_layer("head").kernel
    head.constraint = keras_spft.MARSDistance(None, 0.2, name="manual")
    opt.rebind()
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert 0.19 < float(np.abs(to_np(head)).sum(axis=0).max()) <= 0.2 * (1 + 1e-5)


def test_layers_load_model_would_rebuild_without_their_anchors_are_named():
    """MultiHeadAttention makes its query/key/value/output layers from its own
    config, and a subclassed model its layers in __init__: load_model rebuilds
    them without their constraints. Wrapping them warns and the report says
    so; a wrapper that records its inner layer's config (TimeDistributed) and
    Functional/Sequential models are restored, and not named."""
    inp = keras.Input((4, 8))
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(inp, inp)
    x = keras.layers.TimeDistributed(keras.layers.Dense(3, name="inner"), name="td")(x)
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(keras.layers.Flatten()(x)))
    with pytest.warns(UserWarning, match=r"load_model would rebuild these layers .*: mha/query, mha/key, mha/value, "
                                         r"mha/attention_output \(built by 'mha' \(MultiHeadAttention\)\)"):
        report = keras_spft.wrap_pretrained(model, radius=1.0)
    notes = {w.path: w.note for w in report.wrapped}
    assert "not restored by load_model" in notes["mha/query"] and "not restored" not in notes["td/inner"]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        keras_spft.wrap_pretrained(model, radius=1.0, exclude=["mha"])   # nothing left to warn about

    class Sub(keras.Model):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.d1 = keras.layers.Dense(4, name="d1")
            self.h = keras.layers.Dense(2, name="h")

        def call(self, x):
            return self.h(self.d1(x))
    sub = Sub()
    sub(np.ones((1, 3), "float32"))
    with pytest.warns(UserWarning, match=r"d1, h \(built by the model \(Sub\)\)"):
        keras_spft.wrap_pretrained(sub, radius=0.5, head=["h"], head_radius=1.0)


def _base_and_nested_head():
    L = keras.layers
    base = keras.Sequential([keras.Input((8,)), L.Dense(4, name="b1")], name="base")
    head = keras.Sequential([keras.Input((4,)), L.Dense(3, name="h1")], name="headseq")
    inputs = keras.Input((8,))
    return keras.Model(inputs, head(base(inputs)))


def test_a_head_written_as_a_nested_model_must_be_named():
    """Sequential([base, Sequential([..., Dense])]): the new head is inside a
    nested model too. It was anchored at its random start with the backbone
    radius while head_radius was dropped without a word."""
    model = _base_and_nested_head()
    with pytest.raises(ValueError, match=r"cannot tell the new head.*\['base', 'headseq'\].*head=\['headseq'\]"):
        keras_spft.wrap_pretrained(model, radius=1.0, head_radius=2.0)
    with pytest.raises(ValueError, match="cannot tell the new head"):
        keras_spft.wrap_pretrained(model, strength=0.1, head_strength=1.0, method="l2-sp")
    report = keras_spft.wrap_pretrained(model, radius=1.0, head=["headseq"], head_radius=2.0)
    roles = {w.path: (w.role, w.obj.anchor is None, float(to_np(w.obj.radius))) for w in report.wrapped}
    assert roles == {"base/b1": ("backbone", False, 1.0), "headseq/h1": ("head", True, 2.0)}
    # head=[]: every kernel pre-trained; a head_radius then has nothing to bound.
    report = keras_spft.wrap_pretrained(model, radius=1.0, head=[])
    assert all(w.role == "backbone" for w in report.wrapped) and len(report.wrapped) == 2
    with pytest.raises(ValueError, match=r"`head_radius` is given but no head kernel was found among head=\[\]"):
        keras_spft.wrap_pretrained(model, radius=1.0, head=[], head_radius=2.0)
    # Removing keras-spft's objects needs no head.
    report = keras_spft.wrap_pretrained(model, method="none")
    assert not report.wrapped and all(v.constraint is None for v in model.weights)


def test_a_nested_model_fed_by_kernel_layers_must_be_named():
    """A flat pre-trained base feeding a nested new head,
    keras.Model(base.input, head(base.output)): every base kernel was taken as
    the head (bounded around zero: the pre-trained weights crushed) and the
    new head anchored as backbone. A nested model behind kernel layers is
    either case, so wrap_pretrained asks; parallel towers stay automatic."""
    L = keras.layers
    inp = keras.Input((8,))
    x = L.Dense(6, name="b2")(L.Dense(6, name="b1")(inp))
    head = keras.Sequential([L.Dense(4, name="h1"), L.Dense(3, name="h2")], name="classifier")
    model = keras.Model(inp, head(x))
    with pytest.raises(ValueError, match=r"nested model 'classifier' takes the output of layers with kernels "
                                         r"\('b1', 'b2'\).*head=\['classifier'\] if 'classifier' is new.*"
                                         r"head=\['b1', 'b2'\] if 'classifier' is pre-trained"):
        keras_spft.wrap_pretrained(model, radius=1.0, head_radius=2.0)
    report = keras_spft.wrap_pretrained(model, radius=1.0, head=["classifier"], head_radius=2.0)
    assert {w.path: w.role for w in report.wrapped} == {
        "b1": "backbone", "b2": "backbone", "classifier/h1": "head", "classifier/h2": "head"}
    # Sequential([base, Sequential([...]), Dense]): the suggestion names both new parts.
    seq = keras.Sequential([keras.Input((8,)), keras.Sequential([L.Dense(6, name="b1")], name="base"),
                            keras.Sequential([L.Dense(5, name="h1")], name="hseq"), L.Dense(3, name="out")])
    with pytest.raises(ValueError, match=r"nested model 'hseq'.*head=\['hseq', 'out'\] if 'hseq' is new.*"
                                         r"head=\['out'\] if 'hseq' is pre-trained"):
        keras_spft.wrap_pretrained(seq, radius=1.0, head_radius=2.0)
    # Two pre-trained towers side by side, a Dense on both: the Dense is the head.
    i1, i2 = keras.Input((8,)), keras.Input((8,))
    towers = [keras.Sequential([keras.Input((8,)), L.Dense(6, name="t")], name=n) for n in ("ta", "tb")]
    two = keras.Model([i1, i2], L.Dense(2, name="head")(L.Concatenate()([towers[0](i1), towers[1](i2)])))
    report = keras_spft.wrap_pretrained(two, radius=1.0, head_radius=2.0)
    assert {w.path: w.role for w in report.wrapped} == {"ta/t": "backbone", "tb/t": "backbone", "head": "head"}


def test_a_nested_model_fed_through_an_operation_must_be_named_too():
    """A flat ConvNeXt: its downsampling blocks are nested Sequential models
    behind residuals written `x + block(x)`, a graph operation, not a layer.
    The check stopped at the operation, so 55 of ConvNeXtTiny's 58 pre-trained
    kernels were taken as the head and bounded around zero."""
    L = keras.layers
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="c1")(inp)
    x = x + L.Conv2D(4, 3, padding="same", name="c2")(x)
    x = keras.Sequential([L.Conv2D(4, 1, name="c3")], name="down")(x)
    model = keras.Model(inp, L.Dense(2, name="newhead")(L.GlobalAveragePooling2D()(x)))
    with pytest.raises(ValueError, match=r"nested model 'down' takes the output of layers with kernels \('c1', 'c2'\)"):
        keras_spft.wrap_pretrained(model, radius=1.0, head_radius=1.0)

    base = keras.applications.ConvNeXtTiny(weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3))
    flat = keras.Model(base.input, L.Dense(5, name="newhead")(base.output))
    with pytest.raises(ValueError, match="cannot tell the new head"):
        keras_spft.wrap_pretrained(flat, radius=5.0, head_radius=1.0)
    roles = [w.role for w in keras_spft.wrap_pretrained(flat, radius=5.0, head_radius=1.0, head=["newhead"]).wrapped]
    assert (roles.count("backbone"), roles.count("head")) == (58, 1)
    roles = [w.role for w in keras_spft.wrap_pretrained(keras.Sequential([base, L.Dense(5)]), radius=5.0,
                                                          head_radius=1.0).wrapped]
    assert (roles.count("backbone"), roles.count("head")) == (58, 1)


@pytest.mark.parametrize("method,value", [("l2-pgm", {"head_radius": 3.0}), ("l2-sp", {"head_strength": 1.0})])
def test_batchnorm_in_a_named_head_is_anchored_at_its_gamma_not_at_zero(method, value):
    """gamma starts at 1 by design: a head named with head=[...] bounded its
    BatchNorm gamma around zero (a head found by itself anchors it at 1)."""
    L = keras.layers
    base = keras.Sequential([keras.Input((8,)), L.Dense(6, name="b1")], name="base")
    hs = keras.Sequential([L.Dense(16, name="h1"), L.BatchNormalization(name="hbn"), L.Dense(3, name="h2")], name="hs")
    model = keras.Sequential([keras.Input((8,)), base, hs])
    backbone = {"radius": 1.0} if method.endswith("pgm") else {"strength": 1.0}
    report = keras_spft.wrap_pretrained(model, method=method, head=["hs"], batchnorm="gamma", **backbone, **value)
    roles = {w.path: (w.role, w.obj.anchor is None) for w in report.wrapped}
    assert roles == {"base/b1": ("backbone", False), "hs/h1": ("head", True),
                     "hs/hbn": ("batchnorm", False), "hs/h2": ("head", True)}
    gamma = hs.get_layer("hbn").gamma
    np.testing.assert_array_equal(to_np(report["hs/hbn"].anchor), np.ones(16, "float32"))
    if method.endswith("pgm"):   # at its anchor: the projection leaves it at 1
        np.testing.assert_array_equal(to_np(gamma.constraint(gamma)), np.ones(16, "float32"))
    else:                        # and the penalty is zero there
        assert float(to_np(gamma.regularizer(gamma))) == 0.0


def test_a_file_whose_head_gamma_was_bounded_around_zero_says_how_to_resume(tmp_path):
    """keras-spft before 2026-11-28 bounded a BatchNorm gamma in a named head
    around zero (saved state: radius only); loading such a file now names the
    way that works, and that way keeps the other anchors."""
    L = keras.layers

    def build(seed):
        keras.utils.set_random_seed(seed)
        base = keras.Sequential([keras.Input((8,)), L.Dense(6, name="b1")], name="base")
        hs = keras.Sequential([L.Dense(16, name="h1"), L.BatchNormalization(name="hbn"), L.Dense(3, name="h2")],
                              name="hs")
        return keras.Sequential([keras.Input((8,)), base, hs])
    old = build(0)
    keras_spft.wrap_pretrained(old, radius=1.0, head=["hs"], head_radius=2.0, batchnorm="gamma")
    bn = old.get_layer("hs").get_layer("hbn")
    bn.gamma.constraint = bn.gamma_constraint = keras_spft.MARSDistance(None, 2.0, axis=(), name="hs/hbn/gamma")
    b1 = old.get_layer("base").get_layer("b1").kernel
    anchor = to_np(b1).copy()
    b1.assign(anchor + 0.1)   # fine-tuned: kernel and anchor differ in the file
    old.save_weights(tmp_path / "old.weights.h5")
    new = build(1)
    keras_spft.wrap_pretrained(new, radius=1.0, head=["hs"], head_radius=2.0, batchnorm="gamma")
    with pytest.raises(ValueError, match=r"hs/hbn/gamma.*bounded this BatchNorm gamma around zero.*exclude="):
        new.load_weights(tmp_path / "old.weights.h5")
    new = build(2)   # other weights at wrap time: the file's anchors must come back
    keras_spft.wrap_pretrained(new, radius=1.0, head=["hs"], head_radius=2.0, batchnorm="gamma", exclude=["hbn"])
    new.load_weights(tmp_path / "old.weights.h5")
    report = keras_spft.wrap_pretrained(new, radius=1.0, head=["hs"], head_radius=2.0, batchnorm="gamma")
    assert report["hs/hbn"].anchor is not None
    np.testing.assert_array_equal(to_np(report["base/b1"].anchor), anchor)
    np.testing.assert_array_equal(to_np(new.get_layer("base").get_layer("b1").kernel), anchor + np.float32(0.1))


def test_a_head_radius_with_no_head_outside_the_base_is_refused():
    L = keras.layers
    base = keras.Sequential([keras.Input((8,)), L.Dense(4, name="b1"), L.Dense(2, name="b2")], name="base")
    model = keras.Sequential([keras.Input((8,)), base])
    with pytest.raises(ValueError, match="`head_radius` is given but no head kernel was found outside"):
        keras_spft.wrap_pretrained(model, radius=1.0, head_radius=2.0)
    report = keras_spft.wrap_pretrained(model, radius=1.0)
    assert {w.role for w in report.wrapped} == {"backbone"}


def test_frozen_unsupported_layers_are_reported_and_grouped():
    """Freeze, wrap, fit the head, unfreeze: a PReLU or Embedding frozen at
    wrap time trains unbounded later, so the report must name it; one line
    per reason, not one per layer."""
    L = keras.layers
    base = keras.Sequential([keras.Input((8,)), L.Dense(4, name="b1"), L.PReLU(name="p1"),
                             L.Dense(4, name="b2"), L.PReLU(name="p2"), L.Normalization(name="norm")],
                            name="base")
    base.trainable = False
    inputs = keras.Input((8,))
    model = keras.Model(inputs, L.Dense(2, name="h")(base(inputs)))
    report = keras_spft.wrap_pretrained(model, radius=0.1, head_radius=1.0)
    unsupported = [s for s in report.skipped if "not supported" in s.reason]
    assert [(s.path, s.weights) for s in unsupported] == [("base/p1", ("alpha",)), ("base/p2", ("alpha",))]
    lines = [l for l in str(report).splitlines() if "PReLU is not supported" in l]
    assert len(lines) == 1 and "base/p1, base/p2" in lines[0], str(report)
    assert not any(s.path == "base/norm" for s in report.skipped)   # no trainable weights ever


def test_unsupported_layers_with_weight_matrices_warn_once_grouped_by_type():
    """An Embedding or an RNN holds pre-trained matrices that train unbounded:
    one warning, by type; vectors (LayerNormalization, PReLU) stay quiet,
    like BatchNorm gamma by default; exclude=[...] says it is meant."""
    import warnings

    L = keras.layers
    inputs = keras.Input((5,), dtype="int32")
    x = L.Embedding(20, 4, name="emb")(inputs)
    x = L.LayerNormalization(name="ln")(L.LSTM(4, return_sequences=True, name="lstm1")(x))
    x = L.LSTM(4, name="lstm2")(x)
    model = keras.Model(inputs, L.Dense(2, name="h")(L.PReLU(name="p")(L.Dense(4, name="d")(x))))
    with pytest.warns(UserWarning, match=r"3 layer\(s\) with weight matrices of types keras-spft does not bound "
                                         r"train unbounded \(frozen ones once unfrozen\): Embedding 'emb'; LSTMCell "
                                         r"'lstm1/lstm_cell', 'lstm2/lstm_cell' \(all in report.skipped\)\. Pass exclude=") as caught:
        report = keras_spft.wrap_pretrained(model, radius=0.1, head_radius=1.0)
    assert len([w for w in caught if "weight matrices" in str(w.message)]) == 1
    assert {s.path for s in report.skipped if "not supported" in s.reason} == {"emb", "lstm1/lstm_cell", "lstm2/lstm_cell",
                                                                                 "ln", "p"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        keras_spft.wrap_pretrained(model, radius=0.1, head_radius=1.0, exclude=["emb", "lstm1", "lstm2"])


def test_a_shared_layer_must_get_one_value_from_a_radius_dict():
    L = keras.layers
    shared = L.Dense(4, name="s")
    b1 = keras.Sequential([keras.Input((4,)), shared], name="b1s")
    b2 = keras.Sequential([keras.Input((4,)), shared], name="b2s")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, L.Dense(2, name="h")(L.Add()([b1(inputs), b2(inputs)])))
    with pytest.raises(ValueError, match=r"layer 'b1s/s' is shared.*b1s/s: 1, b2s/s: 2"):
        keras_spft.wrap_pretrained(model, radius={"b1s": 1.0, "b2s": 2.0}, head_radius=1.0)
    with pytest.raises(ValueError, match=r"layer 'b1s/s' is shared.*b1s/s: learned, b2s/s: 0.2"):
        keras_spft.wrap_pretrained(model, radius={"b1s": "learned", "b2s": 0.2}, head_radius=1.0)
    report = keras_spft.wrap_pretrained(model, radius={"s": 3.0, "*": 1.0}, head_radius=1.0)
    assert [(w.path, float(to_np(w.obj.radius))) for w in report.wrapped] == [("b1s/s", 3.0), ("h", 1.0)]


def test_report_lookup_by_weight_and_ambiguous_names():
    model = all_kernel_types_model()
    report = keras_spft.wrap_pretrained(model, radius=0.5, head_radius=1.0)
    dw, pw = report["sep2d/depthwise_kernel"], report["sep2d/pointwise_kernel"]
    assert dw is not pw and dw.axis != pw.axis
    with pytest.raises(KeyError, match="matches 2 wrapped weights.*sep2d/depthwise_kernel, .*sep2d/pointwise_kernel"):
        report["sep2d"]
    assert report["conv2d"] is report["conv2d/kernel"]
    with pytest.raises(KeyError):
        report["nope"]


def test_relative_radii_are_reported_per_row_or_per_kernel():
    model = small_cnn()
    mars = keras_spft.wrap_pretrained(model, radius=0.1, relative=True, head_radius=1.0)
    assert mars.wrapped[0].value == "0.1 x row norm"
    l2 = keras_spft.wrap_pretrained(model, method="l2-pgm", radius=0.1, relative=True, head_radius=1.0)
    w = l2.wrapped[0]
    assert w.value == "0.1 x kernel norm"
    kernel = to_np(w.obj.anchor).astype("float64")
    assert float(to_np(w.obj.radius)) == pytest.approx(0.1 * np.sqrt((kernel ** 2).sum()), rel=1e-6)


def test_head_and_exclude_take_layer_objects():
    model = small_cnn()
    head = model.get_layer("head")
    report = keras_spft.wrap_pretrained(model, radius=0.5, head=head, head_radius=1.0,
                                        exclude=[model.get_layer("base").get_layer("fc")])
    assert report["head"].anchor is None and "base/fc" not in [w.path for w in report.wrapped]
    with pytest.raises(ValueError, match=r"head: layer 'stray' \(a Dense object\) is not a layer of the model"):
        keras_spft.wrap_pretrained(model, radius=0.5, head=[keras.layers.Dense(2, name="stray")])
    with pytest.raises(ValueError, match=r"`exclude` must list layer names, paths or layers; got 3"):
        keras_spft.wrap_pretrained(model, radius=0.5, exclude=[3])
    with pytest.raises(ValueError, match=r"`head` must be a layer name or path, a layer, or a list of them; got 3"):
        keras_spft.wrap_pretrained(model, radius=0.5, head=3)


def test_option_values_that_would_be_ignored_are_refused():
    """A review found these accepted without a word: a head layer's radius in
    `radius` (the head got the default), a layer object as a dict key, a head
    that is wholly excluded, values given to method="none"."""
    L = keras.layers

    def net():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((4,)), L.Dense(3, name="c1"), L.ReLU(name="relu"),
                                 L.Dense(2, name="head")])

    cases = [
        (dict(radius={"head": 50.0, "*": 1.0}, head_radius=1.0),
         r"`radius` names layer 'head', but it is in the new head: give its value in `head_radius`"),
        (dict(radius=1.0, head_radius={"c1": 5.0, "*": 1.0}),
         r"`head_radius` names layer 'c1', but it is not in the head: give its value in `radius`"),
        (dict(radius={"relu": 2.0, "*": 1.0}), r"`radius` names layer 'relu', but it holds no weight to bound"),
        (dict(radius=1.0, head=["head"], exclude=["head"], head_radius=1.0),
         r"every kernel layer of head=\['head'\] is also in `exclude` \(head\)"),
        (dict(method="none", radius=1.0), r"method 'none' removes keras-spft's objects .*`radius` does not apply"),
        (dict(method="none", batchnorm="gamma"), r"`batchnorm` does not apply"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            keras_spft.wrap_pretrained(net(), **kwargs)
    model = net()
    with pytest.raises(ValueError, match=r"`radius` dict keys must be layer names or paths \(or '\*'\), got <Dense"):
        keras_spft.wrap_pretrained(model, radius={model.get_layer("c1"): 5.0, "*": 1.0})
    # What is meant stays possible, also a dict written for the whole model
    # whose layer is then excluded (the fuzz test's case).
    report = keras_spft.wrap_pretrained(net(), radius={"c1": 2.0}, head_radius={"head": 3.0})
    assert {w.path: w.value for w in report.wrapped} == {"c1": "2", "head": "3"}
    wide = keras.Sequential([keras.Input((4,)), L.Dense(3, name="c0"), L.Dense(3, name="c1"), L.Dense(2, name="head")])
    report = keras_spft.wrap_pretrained(wide, radius={"c0": 2.0, "c1": 5.0}, exclude=["c1"])
    assert {w.path: w.value for w in report.wrapped if w.role == "backbone"} == {"c0": "2"}
    # A BatchNorm without gamma says so, whatever `batchnorm` is.
    bn = keras.Sequential([keras.Input((4,)), L.Dense(3, name="c1"), L.BatchNormalization(scale=False, name="bn"),
                           L.Dense(2, name="head")])
    skipped = {s.path: s.reason for s in keras_spft.wrap_pretrained(bn, radius=1.0).skipped}
    assert skipped["bn"] == "BatchNorm without a scale (gamma)"
