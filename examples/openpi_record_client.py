"""A robot (or simulator) loop against a recording flowcorrect server, through
openpi-client unchanged: every request names its episode, and each episode ends with
its outcome, so the server writes it for verifier training.

    # the server (see docs/openpi-verifiers.md):
    #   policy = CorrectedPolicy.from_policy(policy, record_dir="recording/")
    python examples/openpi_record_client.py --host 127.0.0.1 --port 8000 --episodes 300

`make_env()` below is yours: any object with `reset() -> obs_dict`, `step(action) ->
(obs_dict, success, done)`, whose observations are what your openpi policy's input
transforms read. Needs `openpi-client`.
"""

import argparse
import uuid


def make_env():
    raise NotImplementedError(
        "Return your robot or simulator here: reset() -> obs, step(action) -> (obs, "
        "success, done), observations as your openpi policy's transforms expect."
    )


def run_episode(client, env, *, execute: int, placement: dict, max_steps: int) -> bool:
    episode = uuid.uuid4().hex  # any string, the same for every request of the episode
    obs, success, done, steps = env.reset(), False, False, 0
    while not done and steps < max_steps:
        reply = client.infer({**obs, "flowcorrect": {**placement, "episode": episode}})
        for action in reply["actions"][:execute]:
            obs, success, done = env.step(action)
            steps += 1
            if done or steps >= max_steps:
                break
    # The outcome: the server writes the episode now (an episode without one is never
    # trained on). No model runs for this request.
    client.infer({"flowcorrect": {"episode": episode, "done": True, "success": bool(success)}})
    return bool(success)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--execute", type=int, default=10, help="actions run per chunk")
    parser.add_argument("--max-steps", type=int, default=500)
    args = parser.parse_args(argv)

    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    client = WebsocketClientPolicy(args.host, args.port)
    print("server:", client.get_server_metadata().get("flowcorrect"))
    env = make_env()
    wins = sum(
        run_episode(client, env, execute=args.execute, placement={"placement": "off"},
                    max_steps=args.max_steps)
        for _ in range(args.episodes)
    )
    print(f"{wins}/{args.episodes} episodes succeeded")


if __name__ == "__main__":
    main()
