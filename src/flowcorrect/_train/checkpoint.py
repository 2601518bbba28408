"""Training checkpoints with orbax: save every N steps, keep the last k, resume exactly."""

import json
import pathlib
import shutil
from typing import Any

import jax


class CheckpointError(RuntimeError):
    """A training checkpoint cannot be read: truncated, partly deleted, or edited."""


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
        # Saving is asynchronous: a copy, so that the caller's later changes (the
        # history grows at the next step) cannot leak into this checkpoint.
        meta = json.loads(json.dumps(meta))
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.StandardSave(_leaf_dict(jax.tree.leaves(tree))),
                META: ocp.args.JsonSave(meta),
            }
        )
        self.manager.save(step, args=args, force=True)

    def step_path(self, step: int) -> pathlib.Path:
        """The folder of checkpoint `step`."""
        return self.directory / str(step)

    @property
    def aside_dir(self) -> pathlib.Path:
        """Where broken checkpoints are moved by `set_aside`."""
        return self.directory / "corrupt"

    def set_aside(self, steps: list[int]) -> None:
        """Moves broken checkpoints out of the manager's way (never deletes them), so
        that the resumed run can write those steps again."""
        # Under jax.distributed the folder is shared: one process moves, all wait for it.
        if jax.process_index() == 0:
            self.aside_dir.mkdir(exist_ok=True)
            for step in steps:
                target = self.aside_dir / str(step)
                suffix = 0
                while target.exists():
                    suffix += 1
                    target = self.aside_dir / f"{step}.{suffix}"
                shutil.move(str(self.step_path(step)), str(target))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("flowcorrect: checkpoints set aside")
        self.manager.reload()

    def _broken(self, step: int, error: BaseException) -> CheckpointError:
        # tensorstore's messages carry kilobytes of spec: the first part says what failed.
        detail = str(error)
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        err = CheckpointError(
            f"The checkpoint at step {step} ({self.step_path(step)}) cannot be read: it is "
            f"truncated, partly deleted or edited ({type(error).__name__}: {detail})."
        )
        err.__cause__ = error
        return err

    def read_meta(self, step: int) -> dict[str, Any]:
        """The metadata of checkpoint `step`; a `CheckpointError` if it cannot be read."""
        ocp = self._ocp
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()})
            )
            meta = out[META]
        except Exception as e:  # orbax and tensorstore raise many kinds: all mean "broken"
            raise self._broken(step, e) from e
        if not isinstance(meta, dict):
            raise self._broken(step, ValueError(f"its metadata is a {type(meta).__name__}"))
        return meta

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
        try:
            out = self.manager.restore(
                step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(template)})
            )
            stored = out[STATE]
        except Exception as e:  # orbax and tensorstore raise many kinds: all mean "broken"
            raise self._broken(step, e) from e
        if not isinstance(stored, dict):
            raise self._broken(step, ValueError(f"its state is a {type(stored).__name__}"))
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
