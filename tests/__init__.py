# The type checker the import hook names (pyproject.toml) must be an attribute of the
# package: the hook reads it as `tests.typecheck.checker`.
from . import typecheck as typecheck  # noqa: F401
