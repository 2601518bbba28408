"""Training checkpoints with orbax: save every N steps, keep the last k, resume exactly."""

import pathlib
from typing import Any

import jax

STATE = "state"
META = "meta"


def _leaf_dict(leaves: list[Any]) -> dict[str, Any]:
    # Orbax stores a flat dict of arrays; the tree structure comes from the template
    # on restore, so no pytree of Equinox or optax classes is ever reconstructed by it.
    return {f"leaf_{i:05d}": leaf for i, leaf in enumerate(leaves)}


class Checkpointer:
    """A thin layer over `orbax.checkpoint.CheckpointManager` for training state.

    Each checkpoint holds the arrays of a pytree (model, optimiser state, EMA, step,
    PRNG key data) as a flat dict, and a JSON document of metadata (configs, history).
    Saves are asynchronous; [`close`][] waits for them, and `fit` always calls it, also
    when interrupted by an exception.

    **Arguments:**

    - `directory`: where checkpoints go; made absolute (orbax requires it).
    - `keep`: how many recent checkpoints to keep.
    """

    def __init__(self, directory: str | pathlib.Path, *, keep: int):
        # Imported here: inference (load a model, correct) never pays for orbax.
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=True, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint; `None` when there is none."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, tree: Any, meta: dict[str, Any]) -> None:
        """Starts saving the arrays of `tree` and `meta` (JSON) as checkpoint `step`."""
        ocp = self._ocp
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.StandardSave(_leaf_dict(jax.tree.leaves(tree))),
                META: ocp.args.JsonSave(meta),
            }
        )
        self.manager.save(step, args=args, force=True)

    def read_meta(self, step: int) -> dict[str, Any]:
        ocp = self._ocp
        out = self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        return out[META]

    def restore(self, step: int, like: Any) -> Any:
        """Restores checkpoint `step` into the structure, shapes and shardings of `like`."""
        leaves, treedef = jax.tree.flatten(like)
        template = _leaf_dict(
            [
                jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                for x in leaves
            ]
        )
        ocp = self._ocp
        out = self.manager.restore(
            step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(template)})
        )
        stored = out[STATE]
        if set(stored) != set(template):
            raise ValueError(
                f"The checkpoint at step {step} in {self.directory} holds {len(stored)} arrays "
                f"but this training state has {len(template)}: it was written by a different "
                "model or optimiser. Use a fresh checkpoint directory."
            )
        return jax.tree.unflatten(treedef, [stored[k] for k in sorted(template)])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending asynchronous saves, then releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
