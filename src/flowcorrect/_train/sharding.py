"""Data parallelism: a one-axis mesh, batches split over it, the state replicated."""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


def data_parallel_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A one-axis mesh named `"batch"` over `devices` (default: all, on every host)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def check_mesh(mesh: Mesh) -> None:
    if not isinstance(mesh, Mesh) or BATCH_AXIS not in mesh.axis_names:
        raise ValueError(
            f"`mesh` must be a jax.sharding.Mesh with an axis named {BATCH_AXIS!r}, e.g. "
            "fc.train.data_parallel_mesh()."
        )


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of `tree` on every device of `mesh` (under `jax.distributed`, each
    process gives its own copy, which must be the same in every process)."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.tree.map(
            lambda x: jax.device_put(x, sharding) if eqx.is_array(x) else x, tree
        )
    # `device_put` onto devices of other processes is not allowed: each process builds
    # the global array from the copy it holds.
    return jax.tree.map(
        lambda x: _from_local_copy(x, sharding) if eqx.is_array(x) else x, tree
    )


def _from_local_copy(x: Any, sharding: NamedSharding) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _from_local_copy(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def batch_rows(batch: Any) -> int:
    """The rows of a batch: the leading axis of its first array."""
    leaves = [x for x in jax.tree.leaves(batch) if hasattr(x, "shape")]
    if not leaves or not leaves[0].shape:
        raise ValueError("A batch must hold arrays with a leading batch axis.")
    return leaves[0].shape[0]


def place_batch(batch: Any, mesh: Mesh | None) -> Any:
    """Puts a batch on the device(s): split along its first axis over the mesh."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    n = mesh.shape[BATCH_AXIS]
    global_size = batch_rows(batch) * jax.process_count()
    if global_size % n:
        raise ValueError(
            f"The global batch ({global_size} rows) must divide evenly over the mesh's "
            f"{n} devices along {BATCH_AXIS!r}; use a batch size that is a multiple of {n}."
        )

    def put(x: Any) -> Any:
        spec = PartitionSpec(BATCH_AXIS, *([None] * (x.ndim - 1)))
        sharding = NamedSharding(mesh, spec)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        # Under jax.distributed each process holds its own rows of the global batch.
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, batch)


def constrain(tree: Any, mesh: Mesh | None) -> Any:
    """Inside the compiled step: keep the state replicated over the mesh."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, sharding) if eqx.is_array(x) else x, tree
    )
