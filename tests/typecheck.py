"""The type checker this suite runs flowcorrect under, through jaxtyping's import hook
(`--jaxtyping-packages=flowcorrect,tests.typecheck.checker` in pyproject.toml).

Every function and Module of the package is checked with beartype (arguments, return
values, jaxtyping shapes, the fields of a Module once it is built), except the
arguments of what the package exports: its public functions and the constructors of
its public classes, whose return values (and fields) are still checked. Those validate
their own arguments, with messages that name the argument, what it got and the fix; a
precise annotation checked before them would replace those messages with beartype's,
which name no fix. Their annotations are for readers and static checkers; their
behaviour on bad input is what the tests of their messages assert.

Which function is which is decided at its first call after the package is imported
(the hook decorates functions while their modules are still being imported, and a
default argument may be built then; such early calls are fully checked).
"""

import sys
import types
from collections.abc import Callable
from typing import Any

from beartype import beartype

# The packages whose `__all__` is the public surface. `flowcorrect.openpi` exports
# lazily (openpi may be absent), so its functions stay fully checked.
PUBLIC = (
    "flowcorrect",
    "flowcorrect.train",
    "flowcorrect.verifiers",
    "flowcorrect.rtc",
    "flowcorrect.constraints",
    "flowcorrect.configs",
)


def validates_its_arguments(module: str, qualname: str) -> bool:
    """Whether `module.qualname` is an exported function or an exported class's
    `__init__`."""
    parts = qualname.split(".")
    if len(parts) == 1:
        name, kind = parts[0], "function"
    elif len(parts) == 2 and parts[1] == "__init__":
        name, kind = parts[0], "class"
    else:
        return False
    obj = vars(sys.modules[module]).get(name) if module in sys.modules else None
    if obj is None or isinstance(obj, type) != (kind == "class"):
        return False
    for package in PUBLIC:
        mod = sys.modules.get(package)
        if mod is not None and name in getattr(mod, "__all__", ()) and vars(mod).get(name) is obj:
            return True
    return False


def _surface_known() -> bool:
    # Each public package defines `__all__` after its imports: until all of them have,
    # an exported name may not be bound yet (a default argument is built while the
    # package is still being imported).
    return all(hasattr(sys.modules.get(p), "__all__") for p in PUBLIC)


def _return_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    # The same function with its return annotation alone, so that beartype checks what
    # an exported function returns and none of what it was given.
    out = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                             fn.__closure__)
    out.__kwdefaults__ = fn.__kwdefaults__
    out.__qualname__, out.__module__ = fn.__qualname__, fn.__module__
    ret = fn.__annotations__.get("return")
    out.__annotations__ = {} if ret is None else {"return": ret}
    return beartype(out)


def checker(fn: Callable[..., Any]) -> Callable[..., Any]:
    """beartype; for an exported function or constructor, of its return value only."""
    module = getattr(fn, "__module__", "")
    qualname = getattr(fn, "__qualname__", "")
    # Both are built now, at import: building a checker inside a call could happen while
    # hypothesis draws an example, and beartype's code generation uses `random`.
    full, returns = beartype(fn), _return_only(fn)
    checked: list[Callable[..., Any]] = []

    def call(*args, **kwargs):
        if not checked:
            if not _surface_known():
                return full(*args, **kwargs)  # decided once the package is imported
            checked.append(returns if validates_its_arguments(module, qualname) else full)
        return checked[0](*args, **kwargs)

    call.__name__, call.__qualname__, call.__module__ = fn.__name__, qualname, module
    return call
