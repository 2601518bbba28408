"""How the harness's programs read their command lines: tyro, from a config dataclass."""

from typing import Any, TypeVar

import tyro

T = TypeVar("T")


def parse(
    config_type: type[T] | Any,
    argv: list[str] | None,
    *,
    description: str,
    default: T | None = None,
) -> T:
    """The config that `argv` (default `sys.argv[1:]`) names.

    **Arguments:**

    - `config_type`: a config dataclass, whose fields are the flags (`demo_seed` is
        `--demo-seed`, its comment the flag's help), or a union of them as subcommands.
    - `argv`: the arguments, without the program's name.
    - `description`: what `--help` says first.
    - `default`: the config whose values are the flags' defaults, if not the class's.

    A `bool` field is a flag without a value, `--quiet` for a field that is `False` by
    default and `--no-augment` for one that is `True`, with no second spelling.
    """
    # Passed only when given: tyro takes `default=None` for a default of None.
    given = {} if default is None else {"default": default}
    return tyro.cli(config_type, args=argv, description=description,
                    config=(tyro.conf.FlagCreatePairsOff,), **given)  # fmt: skip
