import gc
import os

# Several tests shard over devices; four CPU devices must exist before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Compiles dominate the first examples of a property test, so deadlines would flake.
settings.register_profile(
    "flowcorrect",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("flowcorrect")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Frees every compiled function after each test module.

    Each XLA:CPU executable keeps a few memory mappings for its code until it is freed,
    and jax's caches keep every executable alive. A test worker that runs a few hundred
    of this suite's modules' compiles reached Linux's default limit of 65,530 mappings
    (`vm.max_map_count`), and the next compile segfaulted inside XLA (measured:
    `/proc/<worker>/maps` at 64,971 lines when `fit` crashed). Clearing the caches
    between modules brings a worker back to about 700 mappings at each module's end
    (the largest module peaked near 17,000); modules recompile what they use.
    """
    yield
    jax.clear_caches()
    gc.collect()
