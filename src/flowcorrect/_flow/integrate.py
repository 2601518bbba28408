"""The Euler loop: one `lax.scan` over the flow steps, each taken by a stepper."""

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._custom_types import IntScalar, Scalar
from .._misc import is_int
from .flow import BatchChunks, BatchKeys, Flow


@runtime_checkable
class Stepper(Protocol):
    """What [`flowcorrect.integrate`][] calls: every [`flowcorrect.AbstractInterleaved`][]
    is one."""

    def init(self, flow: Flow, x: BatchChunks) -> Any: ...

    def step(
        self,
        flow: Flow,
        x: BatchChunks,
        t: Scalar,
        dt: Scalar,
        index: IntScalar,
        state: Any,
        keys: BatchKeys,
    ) -> tuple[BatchChunks, BatchChunks, Any]: ...


def integrate(
    flow: Flow,
    stepper: Stepper,
    noise: BatchChunks,
    keys: BatchKeys,
    *,
    start: int = 0,
    stop: int | None = None,
) -> tuple[BatchChunks, Any, Float[Array, "batch steps"] | None]:
    """The Euler loop from `noise`, one `lax.scan` over the flow steps, each step taken
    by `stepper.step`.

    The loop calls only the stepper's `init` and `step`, the way diffrax's
    `diffeqsolve` calls only `solver.step`: any [`flowcorrect.AbstractInterleaved`][]
    runs here, a user's included.

    **Arguments:**

    - `flow`: the policy at this batch, with the energy ([`flowcorrect.Flow`][]).
    - `stepper`: takes each step ([`flowcorrect.AbstractInterleaved`][]); its `init`
        runs on the chunks at step `start`.
    - `noise`: the chunks at step `start`: pure noise when `start = 0`, else the
        samples at time `t_start` of the grid.
    - `keys`: one key per sample. Step `k` receives the same key whatever the range, so
        running `0 ... k` and then `k ... num_steps` gives the keys of one run over all
        steps.
    - `start`, `stop`: static ints, `0 <= start <= stop <= num_steps`: run the steps
        `start ... stop - 1` only (from `t_start` to `t_stop` of the grid). `stop = None`
        means `num_steps`. Defaults: every step.

    **Returns:**

    `(actions, state, step_energy)`: the chunks at step `stop`, the stepper's final
    state, and the energy of the denoised estimate at every step run
    (`(batch, stop - start)`) when the flow's `step_energies` is on and there is an
    energy, else `None`.
    """
    num_steps = flow.num_steps
    stop = num_steps if stop is None else stop
    for name, value in (("start", start), ("stop", stop)):
        if not (is_int(value)):
            raise TypeError(f"fc.integrate `{name}` must be a Python int; got {value!r}.")
    if not 0 <= start <= stop <= num_steps:
        raise ValueError(
            "fc.integrate needs 0 <= start <= stop <= num_steps; got "
            f"start={start}, stop={stop}, num_steps={num_steps}."
        )
    dtype = noise.dtype
    grid = flow.convention.times(num_steps, dtype)
    dt = jnp.asarray(flow.convention.direction / num_steps, dtype)
    step_keys = jax.vmap(lambda k: jax.random.split(k, num_steps))(keys)
    step_keys = jnp.swapaxes(step_keys, 0, 1)
    record = flow.step_energies and flow.energy is not None

    def body(carry, xs):
        x, state = carry
        t, index, ks = xs
        x_next, v, state = stepper.step(flow, x, t, dt, index, state, ks)
        e = flow.energies(flow.denoised(x, v, t)) if record else None
        return (x_next.astype(dtype), state), e

    state = stepper.init(flow, noise)
    index = jnp.arange(num_steps, dtype=jnp.int32)
    if (start, stop) != (0, num_steps):
        # Static slices of the grid: a sub-range sees the very times of a full run.
        grid, index = grid[start : stop + 1], index[start:stop]
        step_keys = step_keys[start:stop]
    (x, state), energies = jax.lax.scan(body, (noise, state), (grid[:-1], index, step_keys))
    return x, state, (None if energies is None else energies.T)


__all__ = ["integrate"]
