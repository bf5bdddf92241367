"""Anchor storage shared by the constraints and regularizers.

An anchored object keeps the pre-trained value of one kernel (its *anchor*) and
its per-row radius as `keras.Variable`s that it owns. Both are written as
binary weights by `model.save(...)` and `model.save_weights(...)`, next to the
layer that holds the object, and read back by `keras.models.load_model` and
`model.load_weights`: the layer config only records their shape and dtype.
"""

import sys
import warnings

import numpy as np
import keras
from keras import ops
from keras.src.saving.keras_saveable import KerasSaveable

__all__ = []   # internal: anchor storage for the constraints and regularizers


#: Key saved beside an object's variables when they hold placeholders.
_UNLOADED = "unloaded"


def _spec(value):
    return {"shape": list(value.shape), "dtype": str(value.dtype)}


def is_spec(value):
    return isinstance(value, dict) and set(value) == {"shape", "dtype"}


def check_flag(value, what, owner):
    """`value` as a bool; a ValueError naming `owner` and `what` for anything
    but True/False (a string such as "no" would otherwise read as True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{owner}: `{what}` must be True or False, got {value!r}.")
    return bool(value)


def check_positive(value, what, owner):
    """Raises `ValueError` unless `value` is a finite number (or array) > 0."""
    if is_spec(value):
        return
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise ValueError(f"{owner}: `{what}` must be a positive number, got {value!r}.")
    try:
        arr = np.asarray(ops.convert_to_numpy(value) if hasattr(value, "shape") else value, dtype="float64")
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: `{what}` must be a positive number (or array of them), got {value!r}.") from None
    if arr.size == 0 or not np.all(np.isfinite(arr)) or not np.all(arr > 0):
        shown = value if arr.size == 1 else f"array with min {np.nanmin(arr) if arr.size else 'n/a'}"
        raise ValueError(
            f"{owner}: `{what}` must be positive and finite, got {shown}."
        )


def is_number(value):
    """Whether `value` is a real number (a Python or NumPy int or float), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_count(value, what, owner, low=1):
    """`value` as an int; a ValueError naming `owner` and `what` unless it is
    a whole number (an int, or a float such as 3.0; not a bool) of at least `low`."""
    whole = isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer())
    if isinstance(value, (bool, np.bool_)) or not whole or value < low:
        raise ValueError(f"{owner}: `{what}` must be an integer of at least {low}, got {value!r}.")
    return int(value)


def _outside_keras():
    """The `stacklevel` of the first caller outside Keras and keras-spft, so
    that a warning raised while Keras loads a file points at the user's
    `load_weights` line."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("keras", "keras_spft"):
        frame, level = frame.f_back, level + 1
    return level


class Anchored(KerasSaveable):
    """Mixin for objects that own an anchor and a radius (or strength).

    Subclasses call `_init_anchor` and `_init_scale` in `__init__` and read
    `self.anchor` (a tensor, or `None` for the origin) and `self.scale`.
    """

    def _init_anchor(self, anchor, name):
        self.name = name
        self._anchor_ready = True
        self._not_ready_because = None   # set when a load left the anchor stale
        if anchor is None:
            self._anchor = None
            return
        if isinstance(anchor, _SharedAnchor):
            self._anchor = anchor.variable
            self._anchor_ready = anchor.ready
            return
        if is_spec(anchor):
            # Rebuilt from a config: the values come from the weights file.
            value = np.zeros(anchor["shape"], dtype=anchor["dtype"])
            self._anchor_ready = False
        else:
            value = np.array(ops.convert_to_numpy(anchor), copy=True)
            if not keras.backend.is_float_dtype(keras.backend.standardize_dtype(value.dtype)):
                raise ValueError(
                    f"{self._owner()}: the anchor must be a floating point "
                    f"array, got dtype {value.dtype}."
                )
            if not np.all(np.isfinite(value)):
                raise ValueError(
                    f"{self._owner()}: the anchor contains NaN or inf."
                )
        self._anchor = keras.Variable(
            value, dtype=str(value.dtype), trainable=False, autocast=False,
            name="anchor",
        )
        _lay_out_like(self._anchor, anchor)

    def _init_scale(self, value, what, shape):
        """Stores a positive scalar or per-row array as a variable."""
        check_positive(value, what, self._owner())
        if is_spec(value):
            arr = np.ones(value["shape"], dtype=value["dtype"])
        else:
            with np.errstate(over="ignore", under="ignore"):
                arr = np.asarray(ops.convert_to_numpy(value), dtype="float32")
            # At least float32's smallest normal number: a subnormal radius is
            # flushed to 0 by XLA on the CPU, and 0 / 0 gives NaN kernels.
            if not (np.all(np.isfinite(arr)) and np.all(arr >= np.finfo(np.float32).tiny)):
                raise ValueError(
                    f"{self._owner()}: `{what}` must be positive and finite in "
                    f"float32 (about 1.2e-38 to 3.4e38), got {value!r} "
                    f"({'overflows' if not np.all(np.isfinite(arr)) else 'underflows'})."
                )
            if arr.ndim and shape is not None:
                try:
                    np.broadcast_to(arr, shape)
                except ValueError:
                    raise ValueError(
                        f"{self._owner()}: `{what}` of shape {arr.shape} does "
                        f"not broadcast to the per-row shape {tuple(shape)}."
                    ) from None
        self._scale_name = what
        self._scale_from_config = is_spec(value)   # placeholder values until loaded
        # A scalar in the config as the shortest decimal of its float32 value
        # (0.1, not 0.10000000149011612): the same float32 when read back.
        self._scale_config = float(str(arr[()])) if arr.ndim == 0 and not is_spec(value) else _spec(arr)
        self._scale = keras.Variable(
            arr, dtype="float32", trainable=False, autocast=False, name=what
        )

    def _owner(self):
        return f"{type(self).__name__}({self.name or 'unnamed'})"

    @property
    def anchor(self):
        """The anchor variable, or `None` when the anchor is the origin."""
        return self._anchor

    @property
    def anchor_spec(self):
        return None if self._anchor is None else _spec(self._anchor)

    def _scale_value(self, dtype, traced_with=None):
        """The radius (or strength) in `dtype`; notes when a JAX trace
        compiles it in as a constant (see `_anchor_value`)."""
        if _compiled_in(traced_with, self._scale):
            self._captured_by_jit = True
        self._check_ready()
        return ops.cast(self._scale.value, dtype)

    def _check_ready(self):
        """Raises while the anchor, or per-row radii (strengths) that a
        config only described, hold placeholders instead of loaded values."""
        if not self._anchor_ready:
            raise RuntimeError(self._not_ready_because or (
                f"{self._owner()} was rebuilt from a config but its anchor "
                "was never loaded: load it with `keras.models.load_model` from a "
                "`.keras` file or `model.load_weights` from a `.weights.h5` file "
                "(the legacy HDF5 format, `model.save('model.h5')`, does not keep "
                "the anchors; cloning a wrapped model through its config, as "
                "`keras.models.clone_model` does, loses them too)."
            ))
        if self._scale_from_config:
            raise RuntimeError(
                f"{self._owner()} was rebuilt from a config but its per-row "
                f"{self._scale_name} values were never loaded (a config records only "
                "their shape): load them with `keras.models.load_model` or "
                "`model.load_weights`, or give the object its values again "
                "(`keras.models.clone_model` loses them)."
            )

    def _anchor_value(self, dtype, traced_with=None):
        if _compiled_in(traced_with, self._anchor):
            # The compiled JAX step now holds this anchor as a constant (an
            # optimizer that carries it as state, RadiusOptimizer, avoids it).
            self._captured_by_jit = True
        self._check_ready()
        return ops.cast(self._anchor.value, dtype)

    def _check_shape(self, w):
        if self._anchor is not None and tuple(w.shape) != tuple(self._anchor.shape):
            raise ValueError(
                f"{self._owner()}: the weight has shape {tuple(w.shape)} but "
                f"the anchor has shape {tuple(self._anchor.shape)}. (LoRA enabled "
                "after wrapping? Keras gives the LoRA factors the kernel's "
                "regularizer; keras-spft does not support LoRA: enable it on layers "
                "left unwrapped, e.g. `exclude=[...]`.)"
            )

    # -- saving ---------------------------------------------------------
    def _obj_type(self):
        # Lets keras' saving library visit this object as a child of the
        # layer that holds it (attribute `kernel_constraint` and the like).
        return "Loss"

    def _own_variables(self):
        out = {self._scale_name: self._scale}
        if self._anchor is not None:
            out["anchor"] = self._anchor
        return out

    def _unloaded(self):
        """`[anchor, scale]`: which of the two hold placeholders (never set
        nor loaded, or left stale by a failed load)."""
        return [not self._anchor_ready, bool(self._scale_from_config)]

    def save_own_variables(self, store):
        for key, var in self._own_variables().items():
            store[key] = var
        if any(self._unloaded()):
            # Placeholders (a clone's zero anchor) must not come back from
            # the file as loaded values: the file says they are not.
            store[_UNLOADED] = np.array(self._unloaded(), dtype="int8")

    def _refuse(self, because):
        """From now on, projecting or penalising raises `because`."""
        self._anchor_ready = False
        self._not_ready_because = because
        return because

    def load_own_variables(self, store):
        own = self._own_variables()
        keys = set(store.keys())
        unloaded = np.asarray(store[_UNLOADED]).tolist() if _UNLOADED in keys else None
        keys.discard(_UNLOADED)
        # Keys later versions added, which files saved before lack (and
        # which an object that loaded such a file lacks in turn).
        missing_optional = {k for k in own if k in self._OPTIONAL_SAVED and k not in keys}
        for k in missing_optional:
            own.pop(k)
        extra_optional = {k: np.asarray(store[k]) for k in keys if k in self._OPTIONAL_SAVED and k not in own}
        keys -= set(extra_optional)
        if not keys:
            if self._anchor is None:
                # A head bound around zero, free in the model that was saved:
                # nothing to restore (its radius is this call's).
                return
            # Weights saved from an unwrapped model (or one whose kernel had
            # the other kind of object), loaded after wrapping: Keras has
            # already written the file's kernel, while the anchor is still
            # the kernel at wrap time. Projecting would pull the loaded
            # weights towards it, so this object refuses from now on (also
            # when skip_mismatch=True turns this error into a warning).
            mine, other = (("constraint", "penalty (l2-sp, mars-sp)")
                           if isinstance(self, keras.constraints.Constraint)
                           else ("penalty", "constraint (l2-pgm, mars-pgm)"))
            raise ValueError(self._refuse(
                f"{self._owner()}: the weights file has no keras-spft {mine} state for this kernel; "
                "its kernel was loaded but the anchor is still the kernel at wrap time. Either the "
                "file comes from a model that was not wrapped (pre-trained weights: load them before "
                "`wrap_pretrained`; for this model, `wrap_pretrained(model, method='none')`, load, "
                f"wrap again), or from a model whose kernels had a {other}, which saves its anchor "
                "under its own name (to resume it, wrap this model with a method of that kind, load, "
                "then wrap again with the method you want: the loaded anchors are kept)."))
        # Every key checked before any is assigned; a mismatch leaves this
        # object refusing (the kernel itself was loaded: projecting it towards
        # a stale anchor or radius would move it silently), also when
        # skip_mismatch=True turns the error into a warning.
        resume = ("; the kernel was loaded but this object's anchor and radius were not, so it refuses "
                  "to project or penalise. To resume that model: `wrap_pretrained(model, method='none')`, "
                  "wrap it the way the saved one was wrapped (method, head, relative radii), load, then "
                  "call `wrap_pretrained` again with the settings you want: the loaded anchors are kept.")
        if keys != set(own):
            how = resume
            if "anchor" in own and "anchor" not in keys and str(self.name or "").endswith("/gamma"):
                how = ("; the file bounded this BatchNorm gamma around zero, as keras-spft before 2026-11-28 "
                       "did for a gamma inside a head named with head=[...]. This object refuses to project "
                       "or penalise until wrapped again. To resume that file: wrap with that layer left out "
                       "(exclude=[...]), load, then call `wrap_pretrained` again: the loaded anchors are kept "
                       "and the gamma is anchored at its loaded value.")
            raise ValueError(self._refuse(
                f"{self._owner()}: the saved state holds {sorted(keys)} but this object needs "
                f"{sorted(own)}" + how))
        values = {}
        for key, var in own.items():
            value = np.asarray(store[key])
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(self._refuse(
                    f"{self._owner()}: the saved {key} has shape {value.shape}, expected "
                    f"{tuple(var.shape)}" + resume))
            values[key] = value
        changed = False
        for key, var in own.items():
            value = values[key].astype(var.dtype)
            current = ops.convert_to_numpy(var)
            differs = not np.array_equal(value, current)
            if (differs and key == self._scale_name and value.ndim == 0 and not self._scale_from_config
                    and not getattr(self, "learn_radius", False) and not getattr(self, "relative", False)
                    and not np.isclose(value, current, rtol=1e-6, atol=0)):
                # A fixed radius or strength given to this wrap call, replaced
                # by the file's: right for resuming, a trap for a new run
                # started from a checkpoint with another value. Radii worked
                # out from the anchor (relative=True, per row or, for the
                # Frobenius norm, one per kernel; batchnorm="reference"): the
                # file's, from the loaded anchor, are the right ones. One message for all kernels alike
                # (Python shows a repeated warning once).
                warnings.warn(
                    f"keras-spft: the weights file's {key} ({value[()]:g}) replaces {current[()]:g} on the "
                    f"kernels wrapped with {current[()]:g} (a file restores the {key} it was saved with, as "
                    f"for resuming). To train with {current[()]:g}, call `wrap_pretrained` again after "
                    "loading: it keeps the loaded anchors.", UserWarning, stacklevel=_outside_keras())
            changed = changed or differs
            var.assign(value)
        if changed and getattr(self, "_captured_by_jit", False):
            warnings.warn(
                f"{self._owner()}: new anchor/radius values were loaded into a "
                "model whose train step JAX has already compiled with the old "
                "ones as constants; call `model.compile(...)` again before "
                "training, or the old values stay in force.",
                RuntimeWarning,
                stacklevel=2,
            )
        self._anchor_ready = True
        self._not_ready_because = None
        self._scale_from_config = False
        if missing_optional:
            self._saved_without(missing_optional)
        if extra_optional:
            self._saved_with(extra_optional)
        if unloaded is not None and any(unloaded):
            # Saved while holding placeholders: still not loaded.
            self._scale_from_config = bool(unloaded[1])
            if unloaded[0]:
                self._refuse(
                    f"{self._owner()}: the file was saved from a model whose keras-spft anchor for this "
                    "kernel had never been loaded (a model rebuilt from its config, e.g. by "
                    "`keras.models.clone_model`, or one whose weights failed to load): it holds no "
                    "anchor. Load the weights of the wrapped model it came from, or wrap the "
                    "pre-trained model again.")
            return
        self._on_anchor_loaded()

    def _on_anchor_loaded(self):
        """Called after `load_own_variables` set the anchor and scale."""

    #: Saved keys a file may lack (added by a later version).
    _OPTIONAL_SAVED = ("batchnorm_reference",)

    def _saved_without(self, keys):
        """Called after a load from a file without these optional keys."""

    def _saved_with(self, values):
        """Called after a load from a file with optional keys this object
        lacks (`{key: array}`)."""

    def __reduce__(self):
        # KerasSaveable pickles whole models; an anchored object pickles as
        # its config plus its variables.
        values = {k: ops.convert_to_numpy(v) for k, v in self._own_variables().items()}
        if any(self._unloaded()):
            values[_UNLOADED] = np.array(self._unloaded(), dtype="int8")
        return (_restore, (type(self), self.get_config(), values, self._not_ready_because))

    def __deepcopy__(self, memo):
        cls, args = self.__reduce__()
        return cls(*args)


def _is_jax_tracer(x):
    if keras.backend.backend() != "jax":
        return False
    import jax

    return isinstance(x, jax.core.Tracer)


def _lay_out_like(anchor, kernel):
    """On JAX under a Keras distribution: `anchor` sharded as the kernel
    variable it copies. Made by the distribution from its own path, which
    no `LayoutMap` entry names, it was otherwise replicated in full on
    every device, whatever `ModelParallel` did with the kernel."""
    layout = getattr(kernel, "_layout", None)
    if keras.backend.backend() != "jax" or layout is None or anchor._layout is layout:
        return
    anchor._layout = layout
    anchor._direct_assign(anchor.value)


def _compiled_in(traced_with, variable):
    """Whether reading `variable` while computing on `traced_with` compiles
    its value into a JAX step as a constant: a JAX trace, outside a
    stateless scope that maps the variable to an input, and outside Keras'
    symbolic scope (`fit` first traces the loss for its shapes alone, before
    `BackupAndRestore` loads a backup: that trace compiles nothing)."""
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope

    return (traced_with is not None and _is_jax_tracer(traced_with)
            and not _in_stateless_mapping(variable) and not in_symbolic_scope())


def _in_stateless_mapping(variable):
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    scope = get_stateless_scope()
    return scope is not None and scope.get_current_value(variable) is not None


class _SharedAnchor:
    """Passes the anchor variable of an existing object to a new one without
    copying (and whether its value was ever set or loaded)."""

    def __init__(self, owner):
        self.owner = owner
        self.variable = owner.anchor
        self.ready = owner._anchor_ready


def _restore(cls, config, values, not_ready_because=None):
    obj = cls.from_config(config)
    obj.load_own_variables(values)
    if _UNLOADED in values:
        # Not a file: the original's reason (None: the default "rebuilt from
        # a config" one, as for a clone).
        obj._not_ready_because = not_ready_because
    return obj
