"""flowcorrect for openpi's Pi0 and Pi0.5 (JAX).

openpi is not on PyPI (the name there is a placeholder); install it from its
repository into the same environment as flowcorrect, with flowcorrect's constraints
so that none of openpi's pins change:

```bash
git clone https://github.com/Physical-Intelligence/openpi
pip install -e openpi -e openpi/packages/openpi-client   # or `uv sync` in openpi/
pip install -c constraints/openpi.txt flowcorrect
```

Importing this module does not import openpi; the first use of a name below does,
with a clear error if openpi is missing.
"""

import importlib
from typing import Any

__all__ = [
    "CorrectedPi0",
    "CorrectedPolicy",
    "Pi0Policy",
    "Pi0Prefix",
    "Pi0TokenTimePolicy",
    "Record",
    "Request",
    "RequestError",
    "ServerLimits",
    "check_observation",
    "constraint_from_spec",
    "energy_batches",
    "parse_request",
    "placement_from_options",
    "placement_from_request",
    "model_fingerprint",
    "pi0_prefix_conditioned_loss",
    "recorded_rollouts",
    "robot_space",
    "sample_actions_with_energy_correction",
    "tiny_siglip",
]

_LAZY = {
    "CorrectedPi0": "._serving",
    "energy_batches": "._data",
    "CorrectedPolicy": "._serving",
    "placement_from_options": "._requests",
    "placement_from_request": "._requests",
    "Record": "._serving",
    "model_fingerprint": "._serving",
    "recorded_rollouts": "._serving",
    "robot_space": "._serving",
    # Request checks import no openpi: they run (and are tested) without it.
    "Request": "._requests",
    "RequestError": "._requests",
    "ServerLimits": "._requests",
    "check_observation": "._requests",
    "constraint_from_spec": "._requests",
    "parse_request": "._requests",
    "Pi0Policy": "._pi0",
    "Pi0Prefix": "._pi0",
    "Pi0TokenTimePolicy": "._rtc_training",
    "pi0_prefix_conditioned_loss": "._rtc_training",
    "sample_actions_with_energy_correction": "._reference_api",
    "tiny_siglip": "._testing",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
