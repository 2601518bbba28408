"""Meta-World: test your own sampler setting against the plain policy, paired.

The harness's pieces used directly, to try something the experiment suites do not
have: here, consensus ranking (the medoid of 8 candidates, no energy) against the plain
policy on the same layouts and the same noise keys. Swap in any placement, energy or
noise scale in `Setting(...)`.

    pip install 'flowcorrect[metaworld]'
    python examples/metaworld_your_setting.py --episodes 30

Trains (or loads from the cache) a flow policy on 10 scripted demonstrations of
pick-place-v3 (about a minute on 2 cores), then runs both settings. 30 episodes of one
key say little: on this task the plain policy's count moves by several episodes from
one noise key to another; claims need >= 300 paired episodes (docs/metaworld.md).
"""

import argparse
import pathlib

import jax
import numpy as np

import flowcorrect as fc
from flowcorrect.metaworld.envs import collect_demos, default_cache
from flowcorrect.metaworld.evaluate import EnvPool, rollout
from flowcorrect.metaworld.experiment import EVAL_SEED0, get_policy
from flowcorrect.metaworld.policy import PolicyConfig
from flowcorrect.metaworld.settings import Setting, make_act
from flowcorrect.metaworld.stats import mcnemar, paired_counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="pick-place-v3")
    parser.add_argument("--demos", type=int, default=10)
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--key", type=int, default=1000)
    parser.add_argument("--policy-steps", type=int, default=1500)
    parser.add_argument("--cache", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    cache = args.cache or default_cache()

    demos = collect_demos(args.task, args.demos, seed=0, cache=cache, progress=False)
    policy = get_policy(args.task, demos, PolicyConfig(horizon=8, steps=args.policy_steps),
                        cache, 0, False)  # fmt: skip
    settings = [
        Setting("plain"),
        Setting("medoid of 8", placement=fc.BestOfN(8, select=fc.Medoid())),
    ]
    seeds = EVAL_SEED0 + np.arange(args.episodes)
    pool = EnvPool(args.task, args.episodes)
    success = {}
    for setting in settings:
        act = make_act(policy, setting, energies={})
        episodes = rollout(pool, seeds, act, jax.random.key(args.key), execute=4,
                           max_steps=300, progress=False)  # fmt: skip
        success[setting.name] = episodes.success.tolist()
        print(f"{setting.name:>12}: {int(episodes.success.sum())}/{args.episodes}")
    wins, losses = paired_counts(success["plain"], success["medoid of 8"])
    print(f"medoid vs plain: +{wins}/-{losses}, exact McNemar p = {mcnemar(wins, losses):.3g}")
    return {"wins": wins, "losses": losses, **{k: sum(v) for k, v in success.items()}}


if __name__ == "__main__":
    main()
