import equinox as eqx
import jax
import jax.numpy as jnp


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-6) -> bool:
    return bool(eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol))


def tree_bitwise_equal(x, y) -> bool:
    """Equal bit for bit: compares the raw bytes, so -0.0 != 0.0 and NaN == NaN."""
    xs, ys = jax.tree.leaves(x), jax.tree.leaves(y)
    if len(xs) != len(ys):
        return False
    for a, b in zip(xs, ys, strict=True):
        a, b = jnp.asarray(a), jnp.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.tobytes() != b.tobytes():
            return False
    return True


# `jax.enable_x64` is new; openpi's pinned jax 0.5.3 has it in `jax.experimental`.
enable_x64 = getattr(jax, "enable_x64", None)
if enable_x64 is None:
    from jax.experimental import enable_x64


class Tanh(eqx.Module):
    """A small nonlinear velocity field that reads its context (a bias)."""

    w: jax.Array
    u: jax.Array
    b: jax.Array

    def __call__(self, context, x, t):
        return jnp.tanh(x @ self.w + (t * self.b + context)[None, :]) @ self.u
