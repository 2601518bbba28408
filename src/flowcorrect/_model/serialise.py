"""Saving and loading a learned energy for inference: JSON config plus `.npz` weights.

No pickle anywhere: the config is JSON, the weights are a NumPy `.npz` read with
`allow_pickle=False` into a template rebuilt from the config, leaf by leaf, with
every name, shape and dtype checked. A SHA-256 of the weights file and a SHA-256 of
the model's class, configuration and weight list are compared, so a mismatched,
truncated or edited file (weights or config) is an error, never a silent partial load.

A model file is untrusted input, so its size is checked before any work that grows
with it: the archive's members (names, declared sizes, and the shapes and dtypes in
their `.npy` headers) are read from the zip's directory and headers, without
decompressing any data, and must be exactly the weights the config lists, within a
limit on the total number of parameters; the config's sizes are bounded by those
weights before the architecture is built; the weights file must lie inside the
model's folder.

This module depends on the models, never the other way round.
"""

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import zipfile
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._misc import is_int
from .base import AbstractLearnedEnergy, LearnedEnergyConfig
from .energy_model import EnergyModel
from .mlp_energy import MLPEnergy

FORMAT = "flowcorrect.LearnedEnergy"
VERSION = 2
# The learned energies that load_model rebuilds by the name in the file; nothing else
# is ever constructed from a file. A user's own class is passed to load_model as `cls`.
BUILT_IN: dict[str, type[AbstractLearnedEnergy]] = {
    "EnergyModel": EnergyModel,
    "MLPEnergy": MLPEnergy,
}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.npz"
# The most arrays a saved model may hold: the reference architecture has about 200.
MAX_ARRAYS = 100_000
# The default bound on a model's parameters (1 GiB of float32): the reference
# architecture has about 2 million.
MAX_PARAMETERS = 2**28
# Fields that count layers, per built-in class: each layer holds at least one array,
# so together they cannot exceed the number of arrays in the file.
_LAYER_FIELDS: dict[type, tuple[str, ...]] = {
    EnergyModel: ("context_blocks", "action_blocks", "head_blocks"),
    MLPEnergy: ("depth",),
}


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


def _config_digest(meta: dict[str, Any]) -> str:
    # Everything that decides what the loaded model computes, in a canonical form.
    covered = {k: meta.get(k) for k in ("format", "version", "class", "config")}
    covered["weights"] = {k: meta.get("weights", {}).get(k) for k in ("file", "sha256", "leaves")}
    text = json.dumps(covered, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def save_model(model: AbstractLearnedEnergy, path: str | pathlib.Path) -> pathlib.Path:
    """Saves a learned energy for inference: `config.json` and `weights.npz` in a folder.

    **Arguments:**

    - `model`: any [`flowcorrect.AbstractLearnedEnergy`][], e.g. an
        [`flowcorrect.EnergyModel`][] or an [`flowcorrect.MLPEnergy`][]. The file
        records its class name and its config.
    - `path`: a folder; created if missing, its two files replaced if present.

    **Returns:**

    The absolute path of the folder.
    """
    if not isinstance(model, AbstractLearnedEnergy):
        raise TypeError(
            "save_model saves a learned energy (a subclass of fc.AbstractLearnedEnergy, "
            f"e.g. fc.EnergyModel or fc.MLPEnergy); got {type(model).__name__}."
        )
    if not isinstance(model.config, LearnedEnergyConfig):
        raise TypeError(
            f"{type(model).__name__}.config must be a fc.LearnedEnergyConfig (a frozen "
            f"dataclass of JSON values); got {type(model.config).__name__}."
        )
    return write_module(
        path, model, {"format": FORMAT, "version": VERSION, "class": type(model).__name__,
                      "config": model.config.to_dict()}
    )


def write_module(path: str | pathlib.Path, module: Any, head: dict[str, Any]) -> pathlib.Path:
    """Writes the arrays of any pytree `module` as named `.npz` weights and `config.json`
    holding `head` (`format`, `version`, `class`, `config`: JSON values), the weight
    list and the checksums: the one file format of every model flowcorrect saves.
    Returns the folder's absolute path."""
    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    names, leaves, _ = _named_leaves(module)
    arrays = {name: np.asarray(jax.device_get(leaf)) for name, leaf in zip(names, leaves)}
    weights = path / WEIGHTS_FILE
    tmp = path / (WEIGHTS_FILE + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, weights)
    meta: dict[str, Any] = {
        **head,
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": _sha256(weights),
            "leaves": {n: [list(a.shape), str(a.dtype)] for n, a in arrays.items()},
        },
    }
    # A round trip through JSON first, so the digest is of what the reader will see.
    meta = json.loads(json.dumps(meta))
    meta["checksum"] = _config_digest(meta)
    # The config is written last, so an interrupted save leaves no loadable model.
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path / CONFIG_FILE)
    return path


def read_meta(
    path: str | pathlib.Path,
    formats: tuple[str, ...],
    version: int,
    what: str,
    save_hint: str,
) -> dict[str, Any]:
    """Reads `config.json` of a folder `write_module` wrote and checks its format (one
    of `formats`), version and checksum; class and config are the caller's to check.
    `what` names the kind of model in errors, `save_hint` says how to save one."""
    path = pathlib.Path(path).absolute()
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ModelFileError(f"No saved {what} at {path}: {CONFIG_FILE} is missing. {save_hint}")
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{config_file} is not valid JSON (truncated?): {e}") from None
    if not isinstance(meta, dict) or meta.get("format") not in formats:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ModelFileError(
            f"{config_file} does not describe a {what}: it holds a {found!r}, not a "
            f"{' or '.join(map(repr, formats))}."
        )
    if meta.get("version") != version:
        raise ModelFileError(
            f"{config_file} has format version {meta.get('version')!r}; this flowcorrect "
            f"reads version {version}. Load it with the flowcorrect that saved it and save "
            "it again with this one."
        )
    if meta.get("checksum") != _config_digest(meta):
        raise ModelFileError(
            f"{config_file} does not match its checksum: its class, config or weight list "
            "was edited after saving (a changed setting such as num_heads keeps the weight "
            "shapes but computes different energies). Save the model again instead of "
            "editing the file."
        )
    return meta


def read_config(
    path: str | pathlib.Path, cls: type[AbstractLearnedEnergy] | None = None
) -> tuple[type[AbstractLearnedEnergy], LearnedEnergyConfig, dict[str, Any]]:
    """Reads and checks `config.json` of a saved model: its class, config and metadata."""
    meta = read_meta(
        path, (FORMAT, "flowcorrect.EnergyModel"), VERSION, "flowcorrect learned energy",
        "Save one with fc.save_model(model, path), which writes config.json and weights.npz.",
    )
    config_file = pathlib.Path(path).absolute() / CONFIG_FILE
    name = meta.get("class")
    if cls is None:
        if name not in BUILT_IN:
            raise ModelFileError(
                f"{config_file} holds a {name!r}, which is not one of flowcorrect's learned "
                f"energies {sorted(BUILT_IN)}; pass your class: load_model(path, cls=...)."
            )
        cls = BUILT_IN[name]
    elif not (isinstance(cls, type) and issubclass(cls, AbstractLearnedEnergy)):
        raise TypeError(f"`cls` must be a subclass of fc.AbstractLearnedEnergy; got {cls!r}.")
    elif cls.__name__ != name:
        raise ModelFileError(f"{config_file} holds a {name!r}, not a {cls.__name__!r}.")
    try:
        config = cls.config_class.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{config_file} holds an invalid config: {e}") from None
    return cls, config, meta


def _weights_path(path: pathlib.Path, meta: dict[str, Any]) -> pathlib.Path:
    """The weights file named in the config, which must lie inside the model's folder
    (after resolving symbolic links)."""
    name = meta["weights"].get("file", WEIGHTS_FILE)
    config_file = path / CONFIG_FILE
    if not isinstance(name, str) or not name:
        raise ModelFileError(f"{config_file} names the weights file {name!r}, not a file name.")
    given = pathlib.PurePath(name)
    if given.is_absolute() or ".." in given.parts or pathlib.PureWindowsPath(name).drive:
        raise ModelFileError(
            f"{config_file} names the weights file {name!r}, which is outside the model's "
            f"folder {path}; a saved model's weights are always a file in its own folder "
            f"({WEIGHTS_FILE}). Save the model again instead of editing config.json."
        )
    weights = path / given
    root = path.resolve()
    resolved = weights.resolve()
    if resolved != root and root not in resolved.parents:
        raise ModelFileError(
            f"{config_file} names the weights file {name!r}, which resolves to {resolved}, "
            f"outside the model's folder {root} (through a symbolic link). Copy the weights "
            "into the folder instead."
        )
    return weights


def _archive_arrays(
    weights: pathlib.Path, declared: dict[str, Any], max_parameters: int
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The shape and dtype of every array in the `.npz`, from the zip's central directory
    and each member's `.npy` header, decompressing no data: each must be an array the
    config declares, of the declared shape and dtype, and of exactly the size its header
    implies, so that reading the data later can allocate no more than the weights."""
    try:
        zf = zipfile.ZipFile(weights)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ModelFileError(f"{weights} cannot be read as .npz weights: {e}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ARRAYS:
            raise ModelFileError(
                f"{weights} holds {len(infos)} members, more than the {MAX_ARRAYS} arrays a "
                "saved model may have: it is not a saved flowcorrect model."
            )
        names = [i.filename for i in infos]
        keys = [n[: -len(".npy")] if n.endswith(".npy") else n for n in names]
        seen: set[str] = set()
        duplicates = sorted({k for k in keys if k in seen or seen.add(k)})
        missing = [n for n in declared if n not in set(keys)]
        extra = [n for n, k in zip(names, keys) if k not in declared or not n.endswith(".npy")]
        if missing or extra or duplicates:
            raise ModelFileError(
                f"The weights in {weights} do not fit the config in {CONFIG_FILE}: missing "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                f"{extra[:5]}{'...' if len(extra) > 5 else ''}"
                + (f", duplicated {duplicates[:5]}" if duplicates else "")
                + "."
            )
        total = 0
        out = {}
        for info, key in zip(infos, keys):
            shape, dtype, header = _npy_header(zf, info, weights)
            want_shape, want_dtype = declared[key]
            if list(shape) != list(want_shape) or str(dtype) != str(want_dtype):
                raise ModelFileError(
                    f"Weight `{key}` in {weights} has shape {shape} and dtype {dtype}, but "
                    f"the config in {CONFIG_FILE} declares {tuple(want_shape)} and "
                    f"{want_dtype}: the config and the weights come from different models."
                )
            count = math.prod(shape)
            if info.file_size != header + count * dtype.itemsize:
                raise ModelFileError(
                    f"Weight `{key}` in {weights} declares {info.file_size} bytes "
                    f"uncompressed, but its header says {shape} {dtype} "
                    f"({header + count * dtype.itemsize} bytes): the archive was edited."
                )
            total += count
            if total > max_parameters:
                raise ModelFileError(
                    f"{weights} declares more than {max_parameters:,} parameters (the limit "
                    f"`max_parameters`); it was refused before reading any data. If you "
                    "trust this file and it is that large, pass a higher max_parameters."
                )
            out[key] = (tuple(shape), dtype)
        return out


def _npy_header(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, weights: pathlib.Path
) -> tuple[tuple[int, ...], np.dtype, int]:
    """A member's shape, dtype and header length, read from its first bytes only."""
    fmt = np.lib.format
    try:
        with zf.open(info) as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            header = f.tell()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError) as e:
        raise ModelFileError(
            f"{weights} cannot be read as .npz weights: member {info.filename!r}: {e}"
        ) from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise ModelFileError(
            f"{weights} cannot be read as .npz weights: member {info.filename!r} holds "
            f"dtype {dtype}; a saved model holds numeric arrays only (object arrays would "
            "need pickle, which is never used)."
        )
    return tuple(int(n) for n in shape), dtype, header


def _check_config_sizes(
    config: LearnedEnergyConfig, cls: type, arrays: dict[str, Any], config_file: pathlib.Path
) -> None:
    """Bounds the config's sizes by the weights before the architecture is built, so that
    an edited size cannot make building the template take unbounded time or memory: a
    width or count is at most the number of parameters, and the layer counts of a
    built-in model at most the number of arrays."""
    parameters = sum(math.prod(shape) for shape, _ in arrays.values())
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for field, value in fields.items():
        if is_int(value) and value > max(parameters, 1):
            raise ModelFileError(
                f"{config_file} sets {field}={value}, more than the {parameters} parameters "
                "its weights hold: the config was edited. Save the model again."
            )
    layer_fields = _LAYER_FIELDS.get(cls, ())
    layers = sum(fields.get(f, 0) or 0 for f in layer_fields)
    if layers > len(arrays):
        raise ModelFileError(
            f"{config_file} asks for {layers} layers "
            f"({', '.join(f'{f}={fields[f]}' for f in layer_fields)}), but its weights "
            f"hold only {len(arrays)} arrays: the config was edited. Save the model again."
        )


def load_model(
    path: str | pathlib.Path,
    *,
    cls: type[AbstractLearnedEnergy] | None = None,
    max_parameters: int = MAX_PARAMETERS,
    **expected: Any,
) -> Any:
    """Loads a learned energy saved by [`flowcorrect.save_model`][], in inference mode.

    Nothing in the files is executed: the class is looked up by name among
    flowcorrect's own ([`flowcorrect.EnergyModel`][], [`flowcorrect.MLPEnergy`][]) or
    must be `cls`, the architecture is rebuilt from the JSON config, and the weights
    are read from `.npz` without pickle, each checked by name, shape and dtype against
    that architecture. A SHA-256 covers the weights file and another the class, config
    and weight list, so an edited `config.json` is refused too.

    **Arguments:**

    - `path`: the folder given to `save_model`.
    - `cls`: your own [`flowcorrect.AbstractLearnedEnergy`][] subclass, when the file
        holds one; `None` (default) for flowcorrect's.
    - `max_parameters`: refuse a file that declares more parameters than this, before
        reading its data. Default `2**28`.
    - `**expected`: config fields the model must have, e.g. `action_dim=7` or
        `context_dim=2048`; a different saved value is an error.

    **Returns:**

    The model, of the class it was saved as, in inference mode (dropout off).

    **Raises:**

    `ModelFileError` (a `ValueError`) naming what is wrong when a file is missing,
    truncated or edited, when the config has unknown or missing fields, when the
    weights do not fit the config, when the weights file lies outside `path`, when the
    model is larger than `max_parameters`, or when the config differs from `expected`.
    """
    if not (is_int(max_parameters)
            and max_parameters >= 1):
        raise ValueError(f"`max_parameters` must be an int >= 1; got {max_parameters!r}.")
    path = pathlib.Path(path).absolute()
    cls, config, meta = read_config(path, cls)
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
    model = read_module(
        path, meta, lambda: eqx.filter_eval_shape(cls, config, key=jax.random.key(0)),
        max_parameters,
        check_sizes=lambda archive: _check_config_sizes(config, cls, archive,
                                                        path / CONFIG_FILE),
    )
    return eqx.nn.inference_mode(model)


def read_module(
    path: pathlib.Path,
    meta: dict[str, Any],
    make_template: Callable[[], Any],
    max_parameters: int,
    check_sizes: Callable[[dict[str, Any]], None] | None = None,
) -> Any:
    """The module `write_module` saved, its arrays read into `make_template()` (a
    pytree of the same structure, arrays or `jax.ShapeDtypeStruct`s) after the weights
    file's checksum, its archive's headers (bounded by `max_parameters`) and then every
    name, shape and dtype are checked; `check_sizes(archive)` runs before the template is
    built, to bound what building it may cost."""
    weights_meta = meta.get("weights")
    if not isinstance(weights_meta, dict):
        raise ModelFileError(f"{path / CONFIG_FILE} has no `weights` entry.")
    declared = weights_meta.get("leaves")
    if not (isinstance(declared, dict) and all(
        isinstance(v, list) and len(v) == 2 and isinstance(v[0], list)
        and all(is_int(n) and n >= 0 for n in v[0])
        and isinstance(v[1], str) for v in declared.values()
    )):
        raise ModelFileError(
            f"{path / CONFIG_FILE} has no valid weight list (`weights.leaves`: name -> "
            "[shape, dtype]). Save the model again."
        )
    weights = _weights_path(path, meta)
    if not weights.is_file():
        raise ModelFileError(f"The weights file {weights} is missing.")
    if _sha256(weights) != weights_meta.get("sha256"):
        raise ModelFileError(
            f"{weights} does not match the checksum in {CONFIG_FILE}: it is truncated, "
            "corrupted, or from another save. Save the model again."
        )

    # Everything before the template is built and any data is read: its cost is
    # bounded by the size of the weights, which is bounded by `max_parameters`.
    archive = _archive_arrays(weights, declared, max_parameters)
    if check_sizes is not None:
        check_sizes(archive)
    template = make_template()
    names, shapes, treedef = _named_leaves(template)
    missing = [n for n in names if n not in archive]
    extra = [n for n in archive if n not in set(names)]
    if missing or extra:
        raise ModelFileError(
            f"The weights in {weights} do not fit the config in {CONFIG_FILE}: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{extra[:5]}{'...' if len(extra) > 5 else ''}."
        )
    for name, like in zip(names, shapes):
        if archive[name] != (tuple(like.shape), like.dtype):
            raise ModelFileError(
                f"Weight `{name}` in {weights} has shape {archive[name][0]} and dtype "
                f"{archive[name][1]}, but the config in {CONFIG_FILE} needs {like.shape} "
                f"and {like.dtype}: the config and the weights come from different models."
            )
    try:
        with open(weights, "rb") as raw, np.load(raw, allow_pickle=False) as data:
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
    return eqx.combine(arrays, static)
