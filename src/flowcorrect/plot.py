"""Plots of what a correction does: alpha sweeps, energies across flow steps, success
against a setting, real-time chunking's chunk switches.

Every function takes plain arrays (NumPy, JAX, lists), draws on a new
`matplotlib.figure.Figure` (or on the `ax` given) and returns the figure; nothing here
touches `pyplot`'s global state, so it works under any backend, headless included.
matplotlib is an optional dependency: `pip install 'flowcorrect[plot]'`.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_EXTRA = "pip install 'flowcorrect[plot]'"


def _matplotlib() -> Any:
    # Imported here, not at module level, so that `import flowcorrect.plot` and the rest
    # of the library work without matplotlib.
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            f"flowcorrect.plot needs matplotlib, which is not installed: {_EXTRA} "
            "(or `pip install matplotlib`)."
        ) from e
    del matplotlib
    return Figure


def _axes(ax: Any, nrows: int = 1, ncols: int = 1, **figure_kwargs: Any) -> tuple[Any, Any]:
    Figure = _matplotlib()
    if ax is not None:
        return ax.figure, ax
    fig = Figure(**figure_kwargs)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes[0, 0] if nrows == ncols == 1 else axes.ravel()


def _vector(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value, dtype=float)
    if array.ndim != 1:
        raise ValueError(
            f"`{name}` must be one-dimensional, got shape {array.shape}; pass one value "
            "per point of the x axis."
        )
    return array


def _curves(name: str, value: Any, length: int) -> np.ndarray:
    """`(length,)` or `(curves, length)` as a 2-d array."""
    array = np.asarray(value, dtype=float)
    shape = array.shape
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != length:
        raise ValueError(
            f"`{name}` must have shape ({length},) or (curves, {length}) to match the x "
            f"axis of length {length}, got shape {shape}."
        )
    return array


def _series(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"`{name}` is an empty mapping; give at least one series.")
        return {str(k): v for k, v in value.items()}
    return {"": value}


def alpha_sweep(
    alphas: Any,
    energies: Any,
    *,
    labels: Sequence[str] | None = None,
    ax: Any = None,
) -> Any:
    """Energy along the correction direction: `E(a - alpha * g)` against `alpha`.

    The reference's "energy landscape" check: a well-behaved energy falls for small
    `alpha` and rises again past its minimum; one that rises at once (or is flat) has a
    gradient that does not point where a step can use it.

    **Arguments:**

    - `alphas`: `(n,)`, step sizes (include 0 to show the energy before the step).
    - `energies`: `(n,)` or `(curves, n)`: the energy after a step of each size, one
        curve per chunk (or per energy).
    - `labels`: one legend label per curve (optional).
    - `ax`: a matplotlib `Axes` to draw on; a new figure if `None`.

    **Returns:**

    The `matplotlib.figure.Figure`. Curve `i` is `ax.lines[i]`, with x data `alphas`
    and y data `energies[i]`.
    """
    x = _vector("alphas", alphas)
    y = _curves("energies", energies, len(x))
    if labels is not None and len(labels) != len(y):
        raise ValueError(f"`labels` has {len(labels)} entries for {len(y)} curves.")
    fig, ax = _axes(ax)
    for i, row in enumerate(y):
        ax.plot(x, row, marker="o", label=None if labels is None else labels[i])
    ax.set_xlabel("alpha (step size)")
    ax.set_ylabel("energy after the step")
    ax.set_title("energy along the correction direction")
    if labels is not None:
        ax.legend()
    return fig


def step_energies(
    energies: Any,
    *,
    times: Any = None,
    ax: Any = None,
) -> Any:
    """Energy of the denoised estimate across flow steps, one line per setting.

    Give it `info.placement.step_energy` from
    `fc.sample(..., step_energies=True)` (shape `(batch, num_steps)`), or a mapping
    from a setting's name to such arrays; each line is the mean over the batch, with
    the batch's range shaded.

    **Arguments:**

    - `energies`: `(num_steps,)`, `(batch, num_steps)`, or a mapping from label to
        either.
    - `times`: `(num_steps,)`, the flow time of each step, for the x axis; the step
        index (`0` = noise) if `None`.
    - `ax`: a matplotlib `Axes` to draw on; a new figure if `None`.

    **Returns:**

    The `matplotlib.figure.Figure`; line `i` (`ax.lines[i]`) holds series `i`'s mean
    over the batch.
    """
    series = _series("energies", energies)
    fig, ax = _axes(ax)
    x = None
    for label, value in series.items():
        array = np.asarray(value, dtype=float)
        length = array.shape[-1] if array.ndim else 0
        y = _curves(f"energies[{label!r}]" if label else "energies", array, length)
        if x is None:
            x = np.arange(length) if times is None else _vector("times", times)
            if len(x) != length:
                raise ValueError(f"`times` has {len(x)} entries for {length} flow steps.")
        elif len(x) != length:
            raise ValueError(f"every series needs {len(x)} flow steps; {label!r} has {length}.")
        (line,) = ax.plot(x, y.mean(axis=0), marker=".", label=label or None)
        if len(y) > 1:
            ax.fill_between(x, y.min(axis=0), y.max(axis=0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("flow step (0 = noise)" if times is None else "flow time t")
    ax.set_ylabel("energy of the denoised estimate")
    ax.set_title("energy across flow steps")
    if any(series):
        ax.legend()
    return fig


def _wilson(successes: np.ndarray, trials: np.ndarray, z: float = 1.96):
    # Wilson's score interval: sensible at 0% and 100%, unlike the normal approximation.
    p = successes / trials
    centre = (p + z**2 / (2 * trials)) / (1 + z**2 / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z**2 / (4 * trials**2)) / (1 + z**2 / trials)
    return centre - half, centre + half


def success(
    values: Any,
    successes: Any,
    *,
    trials: Any = None,
    baseline: Any = None,
    xlabel: str = "K (correction steps)",
    ax: Any = None,
) -> Any:
    """Task success against a setting (K, alpha, n...), one line per series.

    **Arguments:**

    - `values`: `(n,)`, the setting's values (the x axis).
    - `successes`: `(n,)` counts or rates, or a mapping from a series' label (say,
        `"alpha 0.1"`) to such an array.
    - `trials`: episodes per point (a number or `(n,)`); when given, the y axis is the
        success rate `successes / trials` with Wilson 95% intervals as error bars.
    - `baseline`: the plain policy's success on the same scale, drawn as a dashed line.
    - `xlabel`: the x axis' label.
    - `ax`: a matplotlib `Axes` to draw on; a new figure if `None`.

    **Returns:**

    The `matplotlib.figure.Figure`. Without `trials`, line `i` (`ax.lines[i]`) holds
    series `i`; with `trials`, series `i` is the errorbar container `ax.containers[i]`
    (its data line `ax.containers[i].lines[0]` holds `successes / trials`). The
    baseline is the last of `ax.lines`.
    """
    x = _vector("values", values)
    series = _series("successes", successes)
    fig, ax = _axes(ax)
    for label, value in series.items():
        y = _curves(f"successes[{label!r}]" if label else "successes", value, len(x))
        if len(y) != 1:
            raise ValueError("each series of `successes` must be one-dimensional.")
        y = y[0]
        if trials is None:
            ax.plot(x, y, marker="o", label=label or None)
            continue
        n = np.broadcast_to(np.asarray(trials, dtype=float), x.shape)
        if np.any(n <= 0) or np.any(y < 0) or np.any(y > n):
            raise ValueError(
                "with `trials`, `successes` must be counts between 0 and `trials`; got "
                f"successes {y.tolist()} of trials {n.tolist()}."
            )
        rate = y / n
        low, high = _wilson(y, n)
        # Rounding can put a bound a hair on the wrong side of the rate at 0% and 100%.
        low, high = np.minimum(low, rate), np.maximum(high, rate)
        ax.errorbar(x, rate, yerr=[rate - low, high - rate], marker="o", capsize=3,
                    label=label or None)  # fmt: skip
    if baseline is not None:
        ax.axhline(float(baseline), color="gray", linestyle="--", label="plain policy")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("success rate" if trials is not None else "successes")
    ax.set_title("task success")
    if any(series) or baseline is not None:
        ax.legend()
    return fig


def chunk_switches(
    executed: Any,
    switch_steps: Any,
    *,
    chunks: Sequence[Any] = (),
    dims: Any = None,
    ax: Any = None,
) -> Any:
    """Real-time chunking traces: executed actions, the chunks they came from, and the
    control steps at which execution switched to a new chunk.

    **Arguments:**

    - `executed`: `(T, action_dim)` (or `(T,)`), the action executed at each control
        step.
    - `switch_steps`: the control steps at which a new chunk took over (vertical lines).
    - `chunks`: `(start, chunk)` pairs: a chunk `(horizon, action_dim)` whose first
        action is meant for control step `start`, e.g. the previous chunk and the new
        one around a switch (dashed lines).
    - `dims`: the action dimensions to draw, one panel each; all if `None`.
    - `ax`: a matplotlib `Axes` to draw on (only for one dimension); a new figure with
        one panel per dimension if `None`.

    **Returns:**

    The `matplotlib.figure.Figure`. In each panel, line 0 is the executed actions
    (x: `0 ... T - 1`), then one line per chunk (x: `start ... start + horizon - 1`),
    then one vertical line per switch.
    """
    act = np.asarray(executed, dtype=float)
    if act.ndim == 1:
        act = act[:, None]
    if act.ndim != 2:
        raise ValueError(f"`executed` must be (T, action_dim) or (T,), got shape {act.shape}.")
    action_dim = act.shape[1]
    dims = list(range(action_dim)) if dims is None else [int(d) for d in dims]
    bad = [d for d in dims if not 0 <= d < action_dim]
    if bad or not dims:
        raise ValueError(f"`dims` must name action dimensions in [0, {action_dim}), got {dims}.")
    blocks = []
    for i, (start, chunk) in enumerate(chunks):
        c = np.asarray(chunk, dtype=float)
        c = c[:, None] if c.ndim == 1 else c
        if c.ndim != 2 or c.shape[1] != action_dim:
            raise ValueError(
                f"chunk {i} must be (horizon, {action_dim}) like `executed`, got shape "
                f"{np.shape(chunk)}."
            )
        blocks.append((int(start), c))
    switches = np.asarray(switch_steps, dtype=float).reshape(-1)
    if ax is not None and len(dims) != 1:
        raise ValueError(f"`ax` draws one dimension; pass `dims=[d]` (got {len(dims)} dims).")
    fig, axes = _axes(ax, len(dims), 1, figsize=(6.4, 1.6 + 1.6 * len(dims)))
    axes = [axes] if ax is not None or len(dims) == 1 else list(axes)
    for panel, d in zip(axes, dims):
        panel.plot(np.arange(len(act)), act[:, d], color="black", marker=".", label="executed")
        for i, (start, c) in enumerate(blocks):
            panel.plot(start + np.arange(len(c)), c[:, d], linestyle="--", label=f"chunk {i}")
        for s in switches:
            panel.axvline(s, color="red", alpha=0.4, linewidth=1)
        panel.set_ylabel(f"action dim {d}")
    axes[-1].set_xlabel("control step (red: switch to a new chunk)")
    axes[0].set_title("chunk switches")
    axes[0].legend(fontsize="small")
    return fig
