"""The paper's training recipe, shared by the tuner and the command line.

Adam with AMSGrad, learning rate 1e-4 halved every 2/3 of the run (20 of
30 epochs in the paper), sparse cross-entropy on logits, final-epoch
accuracy. Default values and search ranges of each method's
hyper-parameters live here. TensorFlow-free.
"""

import math

import keras

from keras_spft.wrap import METHODS as WRAP_METHODS, PGM_METHODS, SP_METHODS, wrap_pretrained

__all__ = [
    "METHODS",
    "LEARNED_METHODS",
    "DEFAULTS",
    "RADIUS_RANGE",
    "STRENGTH_RANGE",
    "LR_RANGE",
    "default_ranges",
    "method_values",
    "wrap",
    "compile_model",
    "lr_schedule",
]

#: DELTA (Li et al., 2019; `keras_spft.delta`): feature-map regularisation,
#: strengths `alpha` (feature maps) and `beta` (head L2).
DELTA_METHODS = ("delta",)
#: Constraint methods whose backbone radii are learned during training
#: (`radius="learned"`, `keras_spft.RadiusOptimizer`): nothing to search but
#: the head radius, which keeps its default unless a range is given.
LEARNED_METHODS = ("mars-pgm-learned", "l2-pgm-learned")
#: Every method of the recipe: the `wrap_pretrained` ones, the learned-radius
#: ones and "delta".
METHODS = WRAP_METHODS + LEARNED_METHODS + DELTA_METHODS
#: Step size of the learned radii (FTP's).
DEFAULT_RADIUS_LR = 1e-2

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
    "alpha": math.exp(-5.5),          # DELTA, feature maps
    "beta": math.exp(-5.5),           # DELTA, head L2
}


def hyperparameter_names(method):
    """The hyper-parameters a method has: radii, strengths, or none.

    Args:
        method: a `wrap_pretrained` method name or `"delta"`.

    Returns:
        `("radius", "head_radius")` for constraint methods, `("head_radius",)`
        for the learned-radius ones,
        `("strength", "head_strength")` for penalty methods, `("alpha", "beta")`
        for `"delta"`, `()` for `"none"`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")
    if method in DELTA_METHODS:
        return ("alpha", "beta")
    if method in LEARNED_METHODS:
        return ("head_radius",)
    if method in PGM_METHODS:
        return ("radius", "head_radius")
    if method in SP_METHODS:
        return ("strength", "head_strength")
    return ()


def default_ranges(method):
    """`{name: (low, high)}` searched for `method` by default (log-uniform).

    Radii: `[e^0.5, e^3.5]`, strengths: `[e^-10, e^-1]` (the paper's; also
    DELTA's `alpha` and `beta`); `"none"` searches its learning rate in
    `[1e-5, 1e-3]`; the learned-radius methods search nothing (their head
    radius is searched only when a range is given).

    Args:
        method: a method name of `METHODS`.

    Returns:
        `{name: (low, high)}`.

    Example:

    >>> default_ranges("l2-sp")["strength"] == STRENGTH_RANGE
    True
    """
    names = hyperparameter_names(method)
    if method == "none":
        return {"lr": LR_RANGE}
    if method in LEARNED_METHODS:
        return {}
    rng = RADIUS_RANGE if method in PGM_METHODS else STRENGTH_RANGE
    return {n: rng for n in names}


def method_values(method, values=None):
    """Fills in defaults for a method's hyper-parameters.

    Args:
        method: a `wrap_pretrained` method name or `"delta"`.
        values: dict of given values (`None` entries are replaced by the
            defaults; other methods' keys are ignored, `lr` is kept, and a
            key that is no hyper-parameter at all, e.g. `"head-radius"`, is
            a `ValueError`).

    Returns:
        A dict with exactly the method's hyper-parameters (and `lr` if given).

    Example:

    >>> sorted(method_values("mars-pgm", {"radius": 2.0}).items())[1]
    ('radius', 2.0)
    """
    values = dict(values or {})
    unknown = sorted(set(values) - set(DEFAULTS) - {"lr"}, key=str)
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown} for method {method!r}; "
                         f"expected some of {sorted(hyperparameter_names(method)) + ['lr']}.")
    out = {}
    for name in hyperparameter_names(method):
        v = values.get(name)
        out[name] = float(DEFAULTS[name] if v is None else _check_value(v, name, f"method {method!r}"))
    if values.get("lr") is not None:
        out["lr"] = float(_check_value(values["lr"], "lr", f"method {method!r}"))
    return out


#: Hyper-parameters that may be 0 (DELTA without its feature or head term).
_MAY_BE_ZERO = ("alpha", "beta")


def _check_value(value, name, owner, what=None):
    """`value`, once checked: a positive finite number; DELTA's alpha and
    beta may also be 0."""
    from keras_spft.anchors import check_positive, is_number

    if name in _MAY_BE_ZERO and is_number(value) and value == 0:
        return value
    check_positive(value, what or name, owner)
    return value


#: Options `wrap` sets from the method and its values, not from `**options`.
_SET_BY_WRAP = ("method", "radius", "head_radius", "strength", "head_strength", "alpha", "beta")


def _check_wrap_options(method, options):
    """Raises `ValueError` for a `wrap` option that the method's values set,
    or that `wrap_pretrained` (or `DeltaModel`) does not take."""
    import inspect

    for key in options:
        if key in _SET_BY_WRAP:
            raise ValueError(f"wrap option {key!r} is set by the method and its hyper-parameter values "
                             f"(method {method!r}): give it as a value or range, not as a wrap option.")
    if method in DELTA_METHODS:
        from keras_spft.delta import DeltaModel as target
    else:
        target = wrap_pretrained
    params = inspect.signature(target).parameters
    accepted = {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD} - {"self", "model"}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted |= {"name", "dtype", "trainable"}   # DeltaModel passes them on to keras.Model
    unknown = sorted(set(options) - accepted, key=str)
    if unknown:
        raise ValueError(f"unknown wrap option(s) {unknown} for method {method!r}; "
                         f"{target.__name__} takes {sorted(accepted - set(_SET_BY_WRAP))}.")


#: The hyper-parameters of the new head.
HEAD_VALUES = ("head_radius", "head_strength")


def _head_list(head):
    """A `head=` option read once (an iterator would be used up by a test):
    names, layers and dicts as given, other iterables as a list."""
    if head is None or isinstance(head, (str, dict, keras.layers.Layer)):
        return head
    try:
        return list(head)
    except TypeError:
        return head   # wrap_pretrained names the option in its error


def _no_head(head):
    """Whether a `head=` option (read by `_head_list`) says the model has no
    new head (`[]`, or an empty dict of names)."""
    head = _head_list(head)
    return isinstance(head, (list, dict)) and not head


def wrap(model, method, values=None, **options):
    """`wrap_pretrained` (or DELTA) with a method's hyper-parameters from a dict.

    Args:
        model: the built model (backbone + new head).
        method: a `wrap_pretrained` method name or `"delta"`.
        values: `{"radius": .., "head_radius": ..}`, strengths, or DELTA's
            `{"alpha": .., "beta": ..}`; missing ones take `DEFAULTS`.
        **options: further `wrap_pretrained` keyword arguments (with
            `head=[]`, no new head, the head value is left out and giving
            one is an error); for `"delta"`
            `keras_spft.DeltaModel` ones (`attention=` a list of channel
            weights, e.g. from `compute_attention`; `feature_layers=`,
            `variant=`, `head=`).

    Returns:
        The `WrapReport`; for `"delta"` the `DeltaModel` to compile and train
        (its `.model` is `model`, the plain network to evaluate and save).

    Example:

    ```python
    report = wrap(model, "l2-pgm", {"radius": 3.0, "head_radius": 10.0})
    compile_model(model, lr=1e-4)
    ```
    """
    _check_wrap_options(method, options)
    kwargs = {k: v for k, v in method_values(method, values).items() if k != "lr"}
    options = dict(options, **({"head": _head_list(options["head"])} if "head" in options else {}))
    if method not in DELTA_METHODS and _no_head(options.get("head")):
        # head=[]: every kernel pre-trained, so no head value to give (a
        # default head_radius would be refused as bounding nothing).
        given = [k for k in HEAD_VALUES if (values or {}).get(k) is not None]
        if given:
            raise ValueError(f"{given[0]} is given but head=[] says the model has no new head.")
        kwargs = {k: v for k, v in kwargs.items() if k not in HEAD_VALUES}
    if method in LEARNED_METHODS:
        base = method[: -len("-learned")]
        return wrap_pretrained(model, method=base, radius="learned", **kwargs, **options)
    if method in DELTA_METHODS:
        from keras_spft.delta import DeltaModel

        return DeltaModel(model, **kwargs, **options)
    return wrap_pretrained(model, method=method, **kwargs, **options)


def describe(wrapped):
    """One line about what `wrap` returned (a `WrapReport` or a `DeltaModel`)."""
    if hasattr(wrapped, "summary") and hasattr(wrapped, "wrapped"):
        return wrapped.summary()
    att = "computed" if getattr(wrapped, "attention_computed", False) else "uniform"
    return (f"DELTA ({wrapped.variant}): alpha={wrapped.alpha:.4g} on feature maps "
            f"{', '.join(wrapped.feature_layers)} ({att} attention), beta={wrapped.beta:.4g} "
            f"on head {', '.join(wrapped.head)}")


def compile_model(model, lr=DEFAULT_LR, radius_lr=DEFAULT_RADIUS_LR):
    """Compiles with the paper's optimizer: Adam(amsgrad=True), cross-entropy on logits.

    A model with learned radii gets the optimizer inside a
    `keras_spft.RadiusOptimizer` with step size `radius_lr`; so does any
    model with keras-spft constraints on JAX, where the wrapper carries the
    anchors as optimizer state instead of compiling them into the step.

    Args:
        model: the model to train (a `DeltaModel` for `"delta"`).
        lr: Adam's learning rate.
        radius_lr: step size of learned radii (`RadiusOptimizer`).

    Returns:
        `model`, compiled with two metrics: `accuracy`, and `cross_entropy`,
        the loss without the penalties that L2-SP and MARS-SP add to Keras'
        `loss` (whose size depends on the strength: not comparable between
        strengths).

    Example:

    ```python
    model = compile_model(model, lr=1e-4)
    model.fit(splits.train, epochs=30, callbacks=[lr_schedule(1e-4, 30)])
    ```
    """
    from keras_spft.learned import RadiusOptimizer, distance_constraints, learned_constraints

    outputs = getattr(model, "outputs", None) or ()
    if len(outputs) > 1:   # Keras would read the two metrics as one per output
        raise ValueError(
            f"compile_model compiles a classifier with one output; '{model.name}' has {len(outputs)}: "
            "compile it yourself, with a loss and metrics per output.")
    if not isinstance(lr, keras.optimizers.schedules.LearningRateSchedule) and not callable(lr):
        lr = float(_check_value(lr, "lr", "compile_model"))
    radius_lr = float(_check_value(radius_lr, "radius_lr", "compile_model"))
    optimizer = keras.optimizers.Adam(learning_rate=lr, amsgrad=True)
    variables = model.trainable_variables
    on_jax = keras.backend.backend() == "jax"
    if learned_constraints(variables) or (on_jax and distance_constraints(variables)):
        optimizer = RadiusOptimizer(optimizer, radius_learning_rate=radius_lr)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy", keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="cross_entropy")],
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

    Example:

    >>> lr_schedule(1e-4, 30).schedule(20, None)
    5e-05
    """
    every = halving_epochs(epochs)
    return keras.callbacks.LearningRateScheduler(lambda epoch, _: float(lr * 0.5 ** (epoch // every)))
