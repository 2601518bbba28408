"""LIBERO against an openpi server with correction: the same episodes with it off and on.

Serve a LIBERO checkpoint with correction available (docs/openpi.md): in openpi's
`scripts/serve_policy.py`, after `policy = create_policy(args)`,

    import flowcorrect as fc
    from flowcorrect.openpi import CorrectedPolicy
    policy = CorrectedPolicy.from_policy(policy, fc.load_model("energy_ckpt/"),
                                         placement=None, action_dims=7)

then run this client in an environment with LIBERO and `openpi-client` (PyPI):

    python examples/openpi_libero_client.py --suite libero_spatial --trials 20 \
        --setting '{"placement": "best_of_n", "n": 8}'

Every episode runs twice from the same LIBERO initial state and environment seed: once
with `{"placement": "off"}` and once with `--setting`, sent per request in
`obs["flowcorrect"]`, so one server (one compiled model) answers both. The table pairs
the two runs of each episode and gives the exact McNemar p-value of the difference.
The server draws its own flow noise, so the two runs of an episode differ by noise as
well as by the setting: run the "off" setting against itself (`--setting
'{"placement": "off"}'`) to see how many episodes flip by noise alone before reading a
difference (on Meta-World about five of 100 flip either way).

The observation layout (two 224 x 224 camera images rotated by 180 degrees, the
end-effector position, its axis-angle orientation and the gripper's two joint positions,
and the task's language instruction) is the one openpi's LIBERO policies were trained
on. LIBERO's assets cannot be downloaded on the machine that builds flowcorrect, so
this example is not run in its CI.
"""

import argparse
import json
import math

import numpy as np

from flowcorrect.metaworld.stats import mcnemar, paired_counts

# Steps to let the objects settle after a reset, and the no-op action sent meanwhile
# (gripper open); LIBERO's longest demonstration per suite bounds an episode.
SETTLE_STEPS = 10
SETTLE_ACTION = [0.0] * 6 + [-1.0]
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300,
             "libero_10": 520, "libero_90": 400}  # fmt: skip
RENDER = 256


def axis_angle(quat: np.ndarray) -> np.ndarray:
    """A unit quaternion `(x, y, z, w)` as an axis-angle vector."""
    w = float(np.clip(quat[3], -1.0, 1.0))
    sin_half = math.sqrt(max(0.0, 1.0 - w * w))
    if sin_half < 1e-12:
        return np.zeros(3)
    return np.asarray(quat[:3]) * (2.0 * math.acos(w) / sin_half)


def request(obs: dict, instruction: str, size: int, setting: dict) -> dict:
    from openpi_client import image_tools

    def camera(name: str) -> np.ndarray:
        image = np.ascontiguousarray(obs[name][::-1, ::-1])  # as rendered for training
        return image_tools.convert_to_uint8(image_tools.resize_with_pad(image, size, size))

    state = np.concatenate([obs["robot0_eef_pos"], axis_angle(obs["robot0_eef_quat"]),
                            obs["robot0_gripper_qpos"]])  # fmt: skip
    return {
        "observation/image": camera("agentview_image"),
        "observation/wrist_image": camera("robot0_eye_in_hand_image"),
        "observation/state": state,
        "prompt": instruction,
        "flowcorrect": setting,
    }


def episode(env, init_state, instruction, client, setting, args, max_steps) -> bool:
    env.reset()
    obs = env.set_init_state(init_state)
    for _ in range(SETTLE_STEPS):
        obs, _, _, _ = env.step(SETTLE_ACTION)
    plan: list[np.ndarray] = []
    for _ in range(max_steps):
        if not plan:
            answer = client.infer(request(obs, instruction, args.size, setting))
            chunk = np.asarray(answer["actions"])
            if len(chunk) < args.replan:
                raise ValueError(f"The server returned {len(chunk)} actions; --replan is "
                                 f"{args.replan}.")  # fmt: skip
            plan = list(chunk[: args.replan])
        obs, _, done, _ = env.step(plan.pop(0).tolist())
        if done:
            return True
    return False


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--suite", default="libero_spatial", choices=sorted(MAX_STEPS))
    p.add_argument("--trials", type=int, default=20, help="episodes per task (<= 50)")
    p.add_argument("--setting", default='{"placement": "best_of_n", "n": 8}',
                   help="the correction to compare with 'off', as JSON")  # fmt: skip
    p.add_argument("--replan", type=int, default=5, help="actions executed per chunk")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=None, help="write every episode's outcome as JSON")
    args = p.parse_args(argv)
    setting = json.loads(args.setting)

    import pathlib

    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    client = WebsocketClientPolicy(args.host, args.port)
    suite = benchmark.get_benchmark_dict()[args.suite]()
    off, on, names = [], [], []
    for task_id in range(suite.n_tasks):
        task = suite.get_task(task_id)
        bddl = pathlib.Path(get_libero_path("bddl_files")) / task.problem_folder / task.bddl_file
        env = OffScreenRenderEnv(bddl_file_name=str(bddl), camera_heights=RENDER,
                                 camera_widths=RENDER)  # fmt: skip
        states = suite.get_task_init_states(task_id)
        for trial in range(args.trials):
            results = []
            for s in ({"placement": "off"}, setting):
                env.seed(args.seed)  # the seed moves objects even from a fixed state
                results.append(episode(env, states[trial], task.language, client, s, args,
                                       MAX_STEPS[args.suite]))  # fmt: skip
            off.append(results[0])
            on.append(results[1])
            names.append(f"{task.language} #{trial}")
            print(f"{names[-1]}: off {results[0]}, {setting['placement']} {results[1]}",
                  flush=True)  # fmt: skip
        env.close()
    wins, losses = paired_counts(off, on)
    report = {"suite": args.suite, "setting": setting, "episodes": len(off),
              "off": int(sum(off)), "on": int(sum(on)), "wins": wins, "losses": losses,
              "p": mcnemar(wins, losses)}  # fmt: skip
    print(
        f"\n{args.suite}, {len(off)} paired episodes: off {report['off']}, "
        f"{setting} {report['on']} (+{wins}/-{losses}, exact McNemar p = {report['p']:.3g})"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**report, "episodes_off": off, "episodes_on": on, "names": names}, f)
    return report


if __name__ == "__main__":
    main()
