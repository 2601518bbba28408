"""Imports openpi, or says how to install it."""

INSTALL_HINT = (
    "flowcorrect.openpi needs openpi, which is not on PyPI (the `openpi` name there is "
    "a placeholder). Install it from its repository into this environment: "
    "`git clone https://github.com/Physical-Intelligence/openpi && "
    "pip install -e openpi -e openpi/packages/openpi-client`, then reinstall "
    "flowcorrect with `pip install -c constraints/openpi.txt flowcorrect` so that "
    "openpi's pins stay as they are. (openpi's model code imports torch at top level; "
    "a CPU wheel is enough.)"
)


def import_openpi():
    """Returns openpi's `model` and `pi0` modules, or raises ImportError with the fix."""
    try:
        import flax.nnx  # noqa: F401
        from openpi.models import model, pi0
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} (The import failed with: {e})") from e
    return model, pi0
