"""Hostile input: every wrap_pretrained / constraint call either works with
the guarantee or raises a clear ValueError; never a silent wrong result."""

import math

import numpy as np
import keras
from hypothesis import HealthCheck, example, given, settings, strategies as st

import keras_spft
from keras_spft.learned import learned_constraints
from tests.core.helpers import assert_within_bound

NUMBERS = st.one_of(
    st.none(),
    st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf, 1e-30, 1e30, True, "learned", "x"]),
    st.floats(min_value=1e-6, max_value=1e3),
    st.dictionaries(st.sampled_from(["c", "base/fc", "head", "nope", "*"]),
                    st.one_of(st.floats(min_value=-1, max_value=10), st.just(math.nan), st.just("learned")),
                    max_size=3),
)


def _model():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, name="c"),
                             keras.layers.BatchNormalization(name="bn"),
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4, name="fc")], name="base")
    return keras.Sequential([keras.Input((6, 6, 2)), base, keras.layers.Dense(2, name="head")])


MODEL = None


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["none", "l2-sp", "mars-sp", "l2-pgm", "mars-pgm", "mars-pgm-exact", "mars", ""]),
       radius=NUMBERS, head_radius=NUMBERS, strength=NUMBERS,
       head=st.sampled_from([None, [], "head", ["fc", "head"], "missing"]),
       projection=st.sampled_from([None, "scale", "exact", "fast"]),
       relative=st.booleans(), batchnorm=st.sampled_from([None, "gamma", "reference", "yes"]),
       exclude=st.sampled_from([(), ["c"], ["ghost"]]))
@example(method="mars-pgm", radius={"*": "learned", "fc": 2.0}, head_radius=1.0, strength=None, head=None,
         projection="exact", relative=False, batchnorm="gamma", exclude=())
@example(method="l2-pgm", radius="learned", head_radius=None, strength=None, head=None,
         projection=None, relative=True, batchnorm=None, exclude=())
def test_wrap_pretrained_works_or_refuses(method, radius, head_radius, strength, head, projection,
                                          relative, batchnorm, exclude):
    global MODEL
    if MODEL is None:
        MODEL = _model()
    model = MODEL
    keras_spft.wrap_pretrained(model, method="none")  # start clean
    kwargs = dict(method=method, radius=radius, head_radius=head_radius, head=head, projection=projection,
                  relative=relative, batchnorm=batchnorm, exclude=exclude)
    if method.endswith("-sp"):
        kwargs.update(strength=strength, head_strength=head_radius, radius=None, head_radius=None)
    try:
        report = keras_spft.wrap_pretrained(model, **kwargs)
    except ValueError as e:
        msg = str(e)
        assert len(msg) > 20 and "Traceback" not in msg
        # nothing half-attached: a refused call leaves the model clean
        assert all(v.constraint is None and v.regularizer is None for v in model.weights), msg
        return
    # accepted: every attached object is ours and every PGM kernel keeps its bound
    rng = np.random.default_rng(0)
    grads = [keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32")) for v in model.trainable_variables]
    optimizer = keras.optimizers.SGD(1.0)
    if learned_constraints(model.trainable_variables):  # learned radii need the optimizer that learns them
        optimizer = keras_spft.RadiusOptimizer(optimizer)
    optimizer.apply(grads, model.trainable_variables)
    for v in model.trainable_variables:
        c = v.constraint
        if c is not None:
            assert isinstance(c, (keras_spft.MARSDistance, keras_spft.FrobeniusDistance))
            assert_within_bound(c, v)
        if v.regularizer is not None:
            assert math.isfinite(float(keras.ops.convert_to_numpy(v.regularizer(v))))
    for w in report.wrapped:
        r = keras.ops.convert_to_numpy(getattr(w.obj, "radius", None) if hasattr(w.obj, "radius") else w.obj.strength)
        assert np.all(np.isfinite(r)) and np.all(r > 0)


@settings(max_examples=40, deadline=None)
@given(shape=st.sampled_from([(4, 3), (2, 2, 3, 4), (3, 3, 2)]),
       radius=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(0.0)),
       axis=st.sampled_from([0, -1, [0, 1], [], None, 5, [0, 0]]),
       projection=st.sampled_from(["scale", "exact", "none"]),
       relative=st.booleans())
def test_mars_distance_works_or_refuses(shape, radius, axis, projection, relative):
    rng = np.random.default_rng(1)
    anchor = rng.normal(size=shape).astype("float32")
    try:
        c = keras_spft.MARSDistance(anchor, radius, axis=axis, projection=projection, relative=relative)
    except ValueError as e:
        assert any(k in str(e) for k in ("radius", "axis", "projection", "relative")), str(e)
        return
    assert math.isfinite(radius) and radius > 0 and projection in ("scale", "exact")
    w = anchor + rng.normal(size=shape).astype("float32") * 10
    out = keras.ops.convert_to_numpy(c(keras.ops.convert_to_tensor(w)))
    assert np.all(np.isfinite(out))
    assert_within_bound(c, out)


# Valid options only (the hostile strategies above are mostly refused): each
# must be accepted, and every kernel keeps its bound after a real step.
VALID_RADIUS = st.one_of(st.floats(min_value=1e-3, max_value=1e2),
                         st.fixed_dictionaries({"*": st.floats(min_value=1e-3, max_value=1e2)},
                                               optional={"c": st.floats(min_value=1e-3, max_value=1e2),
                                                         "base/fc": st.just("learned")}))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["l2-pgm", "mars-pgm", "mars-pgm-exact", "l2-sp", "mars-sp"]),
       radius=VALID_RADIUS, head_radius=st.one_of(st.none(), st.floats(min_value=1e-3, max_value=1e2)),
       head=st.sampled_from([None, "head", ["head"]]), relative=st.booleans(),
       batchnorm=st.sampled_from([None, "gamma", "reference"]), exclude=st.sampled_from([(), ["fc"]]),
       lr=st.floats(min_value=1e-3, max_value=1e2))
def test_valid_options_are_accepted_and_keep_the_bound(method, radius, head_radius, head, relative,
                                                       batchnorm, exclude, lr):
    global MODEL
    if MODEL is None:
        MODEL = _model()
    model = MODEL
    keras_spft.wrap_pretrained(model, method="none")
    sp = method.endswith("-sp")
    learned = isinstance(radius, dict) and "learned" in radius.values()
    if sp:
        radius = {k: v for k, v in radius.items() if v != "learned"} if isinstance(radius, dict) else radius
        kwargs = dict(strength=radius, head_strength=head_radius)
    else:
        kwargs = dict(radius=radius, head_radius=head_radius, relative=relative and not learned,
                      batchnorm=None if learned and batchnorm == "reference" else batchnorm)
    report = keras_spft.wrap_pretrained(model, method=method, head=head, exclude=exclude, **kwargs)
    assert report.wrapped
    rng = np.random.default_rng(0)
    grads = [keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32")) for v in model.trainable_variables]
    optimizer = keras.optimizers.SGD(lr)
    if learned_constraints(model.trainable_variables):
        optimizer = keras_spft.RadiusOptimizer(optimizer)
    optimizer.apply(grads, model.trainable_variables)
    for v in model.trainable_variables:
        if v.constraint is not None:
            assert_within_bound(v.constraint, v)
        if v.regularizer is not None:
            assert math.isfinite(float(keras.ops.convert_to_numpy(v.regularizer(v))))
