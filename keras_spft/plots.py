"""PNG plots of the diagnostics (matplotlib, imported only when plotting).

`results` arguments map a method name to what one run produced: a
`keras.callbacks.History`, its `.history` dict (as written to JSON), a
`DistanceMonitor`/`GradientNormMonitor`, or a plain `{key: value}` dict of
one epoch's logs.
"""

import math

import numpy as np

__all__ = ["layer_distances", "plot_distance_histograms", "plot_gradient_norms"]


def _history_dict(run):
    """`{key: [values per epoch]}` from any supported run object."""
    if hasattr(run, "history") and isinstance(getattr(run, "history"), dict):
        return run.history  # keras History
    if hasattr(run, "history") and isinstance(getattr(run, "history"), list):
        # A monitor: one dict per logged epoch. Every key gets a value (NaN
        # where that entry lacks it, e.g. a backbone frozen in a first stage),
        # so index i is the same logged epoch for every key.
        keys = [k for entry in run.history for k, v in entry.items() if isinstance(v, (int, float))]
        keys = list(dict.fromkeys(keys))
        return {k: [e.get(k, float("nan")) for e in run.history] for k in keys}
    if isinstance(run, dict):
        return {k: (v if isinstance(v, (list, tuple)) else [v]) for k, v in run.items()}
    raise TypeError(f"cannot read diagnostics from {type(run).__name__}.")


#: The per-layer values `DistanceMonitor` logs.
_METRICS = ("mars", "frobenius", "at_bound")


def layer_distances(run, metric="mars", prefix="spft", epoch=-1, head=False):
    """Per-layer distances of one run at one logged epoch.

    Args:
        run: History, history dict, `DistanceMonitor` or logs dict.
        metric: `"mars"`, `"frobenius"` or `"at_bound"`.
        prefix: the monitor's key prefix.
        epoch: index into the logged values (default: the last). With
            `DistanceMonitor(every > 1)` a History holds the logged epochs
            only, so this indexes those (`monitor.history` has each one's
            `"epoch"`); a layer whose value there is NaN or None is left out.
        head: include head kernels.

    Returns:
        Dict `{layer: value}` for the backbone kernels (and the head ones,
        prefixed `"head/"`, if `head=True`).

    Example:

    ```python
    history = model.fit(x, y, epochs=3, callbacks=[keras_spft.DistanceMonitor()])
    layer_distances(history, metric="mars")   # {"base/conv1": 0.31, ...}
    ```
    """
    if metric not in _METRICS:
        raise ValueError(f"layer_distances: unknown metric {metric!r}; expected one of {_METRICS}.")
    h = _history_dict(run)
    if not any(k.startswith(prefix + "/") for k in h):
        prefixes = sorted({k.split("/", 1)[0] for k in h if "/" in k})
        raise ValueError(f"layer_distances: no '{prefix}/...' values in this run: was a DistanceMonitor with "
                         f"prefix={prefix!r} among its callbacks? (prefixes logged: {prefixes})")
    logged = max((len(v) for k, v in h.items() if k.startswith(prefix + "/")), default=0)
    if isinstance(epoch, (bool, np.bool_)) or not isinstance(epoch, (int, np.integer)) or not -logged <= epoch < logged:
        raise ValueError(f"layer_distances: `epoch` must index the {logged} logged epoch(s) "
                         f"(-{logged} to {logged - 1}), got {epoch!r}.")
    out = {}
    start, end = prefix + "/", "/" + metric
    for key, values in h.items():
        # (len check: the aggregate "spft/at_bound" is no layer)
        if not (key.startswith(start) and key.endswith(end)) or not values \
                or len(key) <= len(start) + len(end):
            continue
        layer = key[len(start):-len(end)]
        if layer.startswith("head/") and not head:
            continue
        try:
            v = values[epoch]
        except IndexError:
            continue
        if v is not None and not math.isnan(float(v)):
            out[layer] = float(v)
    # Aggregates are "prefix/name" ("spft/mars_max"), per-layer keys "prefix/layer/name".
    per_layer = any(k.startswith(start) and "/" in k[len(start):] for k in h)
    if not out and not per_layer:
        raise ValueError(
            f"no '{prefix}/<layer>/{metric}' values in this run: with DistanceMonitor(per_layer=False) a "
            "History holds the aggregates only: pass the monitor itself, whose history keeps every layer.")
    return out


def _figure(nrows, ncols=1, width=6.4, height=2.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, max(2.6, height * nrows)), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _check_results(results, owner):
    if not isinstance(results, dict) or not results:
        raise ValueError(f"{owner}: `results` must be a non-empty dict {{method name: run}} (a History, its "
                         f"history dict or a monitor per method), got {type(results).__name__}.")


def plot_distance_histograms(results, path, metric="mars", radius=None, bins=20,
                             prefix="spft", title=None):
    """Histograms of per-layer distances, one panel per method (Figure 2).

    Each panel counts the backbone kernels by their final MARS (or
    Frobenius) distance to the pre-trained weights; a dashed line marks the
    radius of a constrained run. Panels share the x axis.

    Args:
        results: `{method: run}` (see the module docstring).
        path: output PNG path.
        metric: `"mars"` or `"frobenius"`.
        radius: a float for every panel or `{method: radius}`; `None`: no line.
        bins: number of bins (shared edges across panels).
        prefix: the monitor's key prefix.
        title: figure title.

    Returns:
        `path`.

    Example:

    ```python
    keras_spft.plots.plot_distance_histograms(
        {"mars-pgm": hist_pgm, "none": hist_none}, "distances.png", radius={"mars-pgm": 2.0})
    ```
    """
    _check_results(results, "plot_distance_histograms")
    by_layer = {m: layer_distances(r, metric, prefix) for m, r in results.items()}
    for method, layers in by_layer.items():
        bad = [layer for layer, v in layers.items() if not np.isfinite(v)]
        if bad:
            raise ValueError(f"'{method}': non-finite {metric} distances of {', '.join(bad[:5])}"
                             f"{' ...' if len(bad) > 5 else ''}: the run diverged; nothing to draw.")
    data = {m: np.array(list(v.values())) for m, v in by_layer.items()}
    data = {m: v for m, v in data.items() if v.size}
    if not data:
        raise ValueError(f"no '{prefix}/<layer>/{metric}' values in the results: was DistanceMonitor used "
                         "(with per_layer=False a History holds the aggregates only: pass the monitor "
                         "itself, whose history keeps every layer)?")
    radii = radius if isinstance(radius, dict) else {m: radius for m in data}
    hi = max(max(v.max() for v in data.values()),
             max((r for r in radii.values() if r is not None), default=0.0))
    edges = np.linspace(0.0, hi * 1.05 if hi > 0 else 1.0, bins + 1)
    fig = _figure(len(data))
    axes = fig.subplots(len(data), 1, sharex=True, squeeze=False)[:, 0]
    label = {"mars": "MARS distance to pre-trained weights",
             "frobenius": "Frobenius distance to pre-trained weights"}.get(metric, metric)
    for ax, (method, values) in zip(axes, data.items()):
        ax.hist(values, bins=edges, color="tab:blue", alpha=0.8)
        r = radii.get(method)
        if r is not None:
            ax.axvline(r, color="k", linestyle="--", linewidth=1.2, label=f"radius {r:g}")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_ylabel("layers")
        ax.set_title(f"{method}  ({values.size} layers, median {np.median(values):.3g}, "
                     f"max {values.max():.3g})", fontsize=9)
    axes[-1].set_xlabel(label)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def plot_gradient_norms(results, path, key="grad/global", log_scale=True, title=None):
    """Gradient-norm curves over training, one line per method (Figure 1).

    Args:
        results: `{method: run}`, runs holding `key` per epoch (a
            `GradientNormMonitor` also has the value before training, drawn
            at epoch 0; History values are drawn at epochs 1, 2, ...).
        path: output PNG path.
        key: the logged quantity, e.g. `"grad/global"` or `"grad/<layer>"`.
        log_scale: logarithmic y axis.
        title: figure title.

    Returns:
        `path`.

    Example:

    ```python
    grads = keras_spft.GradientNormMonitor(x[:32], y[:32])
    model.fit(x, y, epochs=3, callbacks=[grads])
    plot_gradient_norms({"mars-pgm": grads}, "gradient_norms.png")
    ```
    """
    _check_results(results, "plot_gradient_norms")
    fig = _figure(1, height=3.6)
    ax = fig.subplots()
    drawn = 0
    for method, run in results.items():
        if hasattr(run, "history") and isinstance(run.history, list):
            pts = [(e["epoch"] + 1, e[key]) for e in run.history if key in e]
        else:
            h = _history_dict(run)
            vals = h.get(key, [])
            epochs = len(h.get("loss", vals))
            if vals and len(vals) != epochs:
                # A History keeps only the epochs a key was logged on: with
                # GradientNormMonitor(every > 1) their numbers are lost.
                raise ValueError(
                    f"'{method}': '{key}' was logged on {len(vals)} of {epochs} epochs "
                    "(GradientNormMonitor(every > 1)?); pass the monitor itself, "
                    "whose history records the epochs."
                )
            pts = [(i + 1, v) for i, v in enumerate(vals)
                   if v is not None and not math.isnan(float(v))]   # NaN: an epoch the monitor skipped
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", markersize=3, label=method)
        drawn += 1
    if not drawn:
        raise ValueError(f"no '{key}' values in the results: was GradientNormMonitor used?")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{key}  ({'loss on the probe batch' if key.endswith('/loss') else 'L2 norm of the gradient'})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Gradient norm of the training loss")
    fig.savefig(path, dpi=110)
    return path
