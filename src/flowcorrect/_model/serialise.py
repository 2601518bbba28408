"""Saving and loading an energy model for inference: JSON config plus `.npz` weights.

No pickle anywhere: the config is JSON, the weights are a NumPy `.npz` read with
`allow_pickle=False` into a template rebuilt from the config, leaf by leaf, with
every name, shape and dtype checked and a SHA-256 of the weights file compared, so a
mismatched, truncated or edited file is an error, never a silent partial load.
"""

import hashlib
import json
import os
import pathlib
import zipfile
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .config import EnergyModelConfig
from .energy_model import EnergyModel

FORMAT = "flowcorrect.EnergyModel"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.npz"


class ModelFileError(ValueError):
    """A saved energy model cannot be loaded: missing, truncated, edited or mismatched."""


def _is_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _named_leaves(model: Any) -> tuple[list[str], list[Any], Any]:
    arrays = eqx.filter(model, _is_array)
    flat, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    names = [jax.tree_util.keystr(path) for path, _ in flat]
    return names, [leaf for _, leaf in flat], treedef


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: EnergyModel, path: str | pathlib.Path) -> pathlib.Path:
    """Saves an energy model for inference: `config.json` and `weights.npz` in a folder.

    **Arguments:**

    - `model`: an [`flowcorrect.EnergyModel`][].
    - `path`: a folder; created if missing, its two files replaced if present.

    **Returns:**

    The absolute path of the folder.
    """
    if not isinstance(model, EnergyModel):
        raise TypeError(f"save_model saves an EnergyModel; got {type(model).__name__}.")
    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    names, leaves, _ = _named_leaves(model)
    arrays = {name: np.asarray(jax.device_get(leaf)) for name, leaf in zip(names, leaves)}
    weights = path / WEIGHTS_FILE
    tmp = path / (WEIGHTS_FILE + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, weights)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": _sha256(weights),
            "leaves": {n: [list(a.shape), str(a.dtype)] for n, a in arrays.items()},
        },
    }
    # The config is written last, so an interrupted save leaves no loadable model.
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path / CONFIG_FILE)
    return path


def read_config(path: str | pathlib.Path) -> tuple[EnergyModelConfig, dict[str, Any]]:
    """Reads and checks `config.json` of a saved model; returns the config and metadata."""
    path = pathlib.Path(path).absolute()
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ModelFileError(
            f"No saved energy model at {path}: {CONFIG_FILE} is missing. Save one with "
            "EnergyModel.save(path), which writes config.json and weights.npz."
        )
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{config_file} is not valid JSON (truncated?): {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{config_file} does not describe a flowcorrect EnergyModel.")
    if meta.get("version") != VERSION:
        raise ModelFileError(
            f"{config_file} has format version {meta.get('version')!r}; this flowcorrect "
            f"reads version {VERSION}."
        )
    try:
        config = EnergyModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{config_file} holds an invalid config: {e}") from None
    return config, meta


def load_model(path: str | pathlib.Path, **expected: Any) -> EnergyModel:
    """Loads an energy model saved by [`flowcorrect.save_model`][], in inference mode.

    Nothing in the files is executed: the architecture is rebuilt from the JSON config
    and the weights are read from `.npz` without pickle, each checked by name, shape and
    dtype against that architecture, and the whole file against its SHA-256.

    **Arguments:**

    - `path`: the folder given to `save`.
    - `**expected`: config fields the model must have, e.g. `action_dim=7` or
        `context_dim=2048`; a different saved value is an error.

    **Returns:**

    The [`flowcorrect.EnergyModel`][], in inference mode (dropout off).

    **Raises:**

    `ModelFileError` (a `ValueError`) naming what is wrong when a file is missing,
    truncated or edited, when the weights do not fit the config, or when the config
    differs from `expected`.
    """
    path = pathlib.Path(path).absolute()
    config, meta = read_config(path)
    known = set(config.to_dict())
    for name, want in expected.items():
        if name not in known:
            raise TypeError(f"load got an unknown expected field {name!r}; known: {sorted(known)}.")
        have = getattr(config, name)
        if have != want:
            raise ModelFileError(
                f"The model at {path} has {name}={have!r}, but {name}={want!r} was expected. "
                "Load a model trained for this setting, or train one."
            )
    weights_meta = meta.get("weights")
    if not isinstance(weights_meta, dict):
        raise ModelFileError(f"{path / CONFIG_FILE} has no `weights` entry.")
    weights = path / str(weights_meta.get("file", WEIGHTS_FILE))
    if not weights.is_file():
        raise ModelFileError(f"The weights file {weights} is missing.")
    if _sha256(weights) != weights_meta.get("sha256"):
        raise ModelFileError(
            f"{weights} does not match the checksum in {CONFIG_FILE}: it is truncated, "
            "corrupted, or from another save. Save the model again."
        )

    template = eqx.filter_eval_shape(EnergyModel, config, key=jax.random.key(0))
    names, shapes, treedef = _named_leaves(template)
    try:
        with np.load(weights, allow_pickle=False) as data:
            stored = {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ModelFileError(f"{weights} cannot be read as .npz weights: {e}") from None
    missing = [n for n in names if n not in stored]
    extra = [n for n in stored if n not in set(names)]
    if missing or extra:
        raise ModelFileError(
            f"The weights in {weights} do not fit the config in {CONFIG_FILE}: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{extra[:5]}{'...' if len(extra) > 5 else ''}."
        )
    leaves = []
    for name, like in zip(names, shapes):
        array = stored[name]
        if array.shape != like.shape or array.dtype != like.dtype:
            raise ModelFileError(
                f"Weight `{name}` in {weights} has shape {array.shape} and dtype "
                f"{array.dtype}, but the config in {CONFIG_FILE} needs {like.shape} and "
                f"{like.dtype}: the config and the weights come from different models."
            )
        leaves.append(jnp.asarray(array))
    arrays = jax.tree_util.tree_unflatten(treedef, leaves)
    _, static = eqx.partition(template, _is_array)
    model = eqx.combine(arrays, static)
    return eqx.nn.inference_mode(model)
