"""The lazy import of Meta-World, with an error that says how to install it."""

import importlib
from typing import Any

INSTALL_HINT = "pip install 'flowcorrect[metaworld]'"


def require_metaworld() -> Any:
    """Imports and returns the `metaworld` module, or raises an ImportError naming the extra."""
    try:
        return importlib.import_module("metaworld")
    except ImportError as e:
        raise ImportError(
            "flowcorrect.metaworld needs the Meta-World simulator (metaworld >= 3, with "
            f"gymnasium's MuJoCo and `packaging`). Install the extra: {INSTALL_HINT}"
        ) from e
