"""The main demo: does correction make a Meta-World policy succeed more?

    pip install 'flowcorrect[metaworld]'
    python -m flowcorrect.metaworld.demo

One task (pick-place-v3, 10 scripted demonstrations), a small flow policy and an
energy trained in a minute or two (cached in ~/.cache/flowcorrect/metaworld, so a
second run only evaluates), 30 paired episodes: the plain policy, the plain policy at
half the noise, the reference recipe post hoc and best-of-8 by energy, with exact
McNemar p-values. Takes a few minutes on a 2-core CPU. The full experiments are
`python -m flowcorrect.metaworld.experiment --help`; results in docs/metaworld.md.
"""

from . import _cli
from .experiment import ExperimentConfig, run

#: The demo's settings: the experiment's flags with these defaults.
DEMO = ExperimentConfig(suite="demo", episodes=30, keys=1, policy_steps=1500,
                        energy_steps=150, out="results/metaworld-demo")  # fmt: skip


def parse_cli(argv: list[str] | None = None) -> ExperimentConfig:
    """The `ExperimentConfig` that the command line `argv` names, with the defaults of
    `DEMO`."""
    return _cli.parse(ExperimentConfig, argv, description=__doc__.splitlines()[0],
                      default=DEMO)  # fmt: skip


def main(argv: list[str] | None = None):
    report = run(parse_cli(argv))
    print(
        "\nOne noise key and 30 episodes: a difference of a few episodes is noise (see the "
        "null spread in docs/metaworld.md). Claims need >= 300 paired episodes."
    )
    return report


if __name__ == "__main__":
    main()
