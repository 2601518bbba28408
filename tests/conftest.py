import os

# Several tests shard over devices; four CPU devices must exist before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Compiles dominate the first examples of a property test, so deadlines would flake.
settings.register_profile(
    "flowcorrect",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("flowcorrect")
