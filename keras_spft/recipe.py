"""The paper's training recipe, shared by the tuner and the command line.

Adam with AMSGrad, learning rate 1e-4 halved every 2/3 of the run (20 of
30 epochs in the paper), sparse cross-entropy on logits, final-epoch
accuracy. Default values and search ranges of each method's
hyper-parameters live here. TensorFlow-free.
"""

import math

import keras

from keras_spft.wrap import METHODS, PGM_METHODS, SP_METHODS, wrap_pretrained

#: Search ranges of Gouk et al. (2021), log-uniform.
RADIUS_RANGE = (math.exp(0.5), math.exp(3.5))      # 1.65 .. 33.1
STRENGTH_RANGE = (math.exp(-10.0), math.exp(-1.0))  # 4.5e-5 .. 0.37
#: Learning-rate range searched for the "none" baseline (its fair shot).
LR_RANGE = (1e-5, 1e-3)
DEFAULT_LR = 1e-4

#: Defaults when nothing is searched: the geometric centres of the ranges.
DEFAULTS = {
    "radius": math.exp(2.0),          # 7.39
    "head_radius": math.exp(2.0),
    "strength": math.exp(-5.5),       # 4.1e-3
    "head_strength": math.exp(-5.5),
}


def hyperparameter_names(method):
    """The hyper-parameters a method has: radii, strengths, or none.

    Args:
        method: a `wrap_pretrained` method name.

    Returns:
        `("radius", "head_radius")` for constraint methods,
        `("strength", "head_strength")` for penalty methods, `()` for `"none"`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")
    if method in PGM_METHODS:
        return ("radius", "head_radius")
    if method in SP_METHODS:
        return ("strength", "head_strength")
    return ()


def default_ranges(method):
    """`{name: (low, high)}` searched for `method` by default (log-uniform).

    Radii: `[e^0.5, e^3.5]`, strengths: `[e^-10, e^-1]` (the paper's);
    `"none"` searches its learning rate in `[1e-5, 1e-3]`.
    """
    names = hyperparameter_names(method)
    if method == "none":
        return {"lr": LR_RANGE}
    rng = RADIUS_RANGE if method in PGM_METHODS else STRENGTH_RANGE
    return {n: rng for n in names}


def method_values(method, values=None):
    """Fills in defaults for a method's hyper-parameters.

    Args:
        method: a `wrap_pretrained` method name.
        values: dict of given values (`None` entries are replaced by the
            defaults; keys other than the method's are ignored, except `lr`).

    Returns:
        A dict with exactly the method's hyper-parameters (and `lr` if given).
    """
    values = dict(values or {})
    out = {}
    for name in hyperparameter_names(method):
        v = values.get(name)
        out[name] = float(DEFAULTS[name] if v is None else v)
    if values.get("lr") is not None:
        out["lr"] = float(values["lr"])
    return out


def wrap(model, method, values=None, **options):
    """`wrap_pretrained` with a method's hyper-parameters from a dict.

    Args:
        model: the built model (backbone + new head).
        method: a `wrap_pretrained` method name.
        values: `{"radius": .., "head_radius": ..}` or strengths; missing
            ones take `DEFAULTS`.
        **options: further `wrap_pretrained` keyword arguments.

    Returns:
        The `WrapReport`.
    """
    kwargs = {k: v for k, v in method_values(method, values).items() if k != "lr"}
    return wrap_pretrained(model, method=method, **kwargs, **options)


def compile_model(model, lr=DEFAULT_LR):
    """Compiles with the paper's optimizer: Adam(amsgrad=True), cross-entropy on logits."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr, amsgrad=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def halving_epochs(epochs):
    """Epochs between learning-rate halvings: 20 of 30 in the paper, scaled."""
    return max(1, int(round(epochs * 20 / 30)))


def lr_schedule(lr, epochs):
    """A callback halving `lr` every `halving_epochs(epochs)` epochs.

    Args:
        lr: the initial learning rate.
        epochs: the length of the run.

    Returns:
        A `keras.callbacks.LearningRateScheduler`.
    """
    every = halving_epochs(epochs)
    return keras.callbacks.LearningRateScheduler(lambda epoch, _: float(lr * 0.5 ** (epoch // every)))
