"""The device side of a link experiment, driven line by line.

Runs inside the device namespace (``ip netns exec``) so that its traffic to
the edge crosses the emulated link, while the driver (a test or
``scripts/bench_link.py``) stays outside and changes the link between turns.

Protocol: one JSON object per line on stdin, one per line on stdout.

- ``{"cmd": "turn", "prompt": str}`` -> ``{"telemetry": {...}, "estimates": {...}|null, "comm_s": float|null}``
- ``{"cmd": "new_conversation"}`` -> ``{"ok": true}``
- ``{"cmd": "quit"}`` -> exits

The first line written is ``{"ready": true, "policy": ...}``; errors are
``{"error": str}``.  Logs go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Sequence

from device_runtime.routing.routers.base import Router

#: Policies of the validation benchmark (issue 5, item 5), plus ``constant:P``.
POLICY_CHOICES = ("device", "edge", "random", "bert-noctx", "bert-ctx")


class ConstantRouter(Router):
    """p is the same for every turn: isolates the latency term of eq. (11)."""

    name = "constant"
    tau_r = 0.0

    def __init__(self, p: float) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        self.p = p

    def score(self, prompt: str, context=()) -> float:
        return self.p


def _no_context_policy(router: Router, threshold: float):
    """BERT without context: the router reads only L_p (eq. 4 with C_t = 0)."""
    from device_runtime.routing.policies import AutoPolicy

    class NoContextPolicy(AutoPolicy):
        name = "auto-noctx"

        def choose(self, params, turn, prompt, context: Sequence[dict]):
            turn = dataclasses.replace(turn, router_tokens=turn.prompt_tokens)
            return super().choose(params, turn, prompt, ())

    return NoContextPolicy(router, threshold)


def build(args: argparse.Namespace):
    """The orchestrator, and its online estimation hook under ``--online`` (else None)."""
    from device_runtime.link.edge_client import EdgeClient
    from device_runtime.link.profile import live_cost_params
    from device_runtime.llm.slm import SLM_BACKENDS, SLMSettings
    from device_runtime.routing.policies import AutoPolicy, PolicySettings, create_policy
    from device_runtime.runtime.orchestrator import Orchestrator, OrchestratorSettings

    params = live_cost_params(args.profile, benchmark="mt-bench")
    if args.alpha is not None:
        params = params.with_(alpha=args.alpha)
    if args.policy.startswith("constant:"):
        policy = AutoPolicy(ConstantRouter(float(args.policy.split(":", 1)[1])), args.threshold)
    elif args.policy in ("bert-ctx", "bert-noctx"):
        from device_runtime.routing.routers.base import ROUTERS

        router = ROUTERS.create("bert", bundle=args.bundle)
        policy = AutoPolicy(router, args.threshold) if args.policy == "bert-ctx" else _no_context_policy(router, args.threshold)
    else:
        policy = create_policy(PolicySettings(policy=args.policy, threshold=args.threshold, seed=args.seed))
    slm = SLM_BACKENDS.create("llama-cpp", SLMSettings(model_path=args.slm, n_threads=args.threads, seed=args.seed))
    edge = EdgeClient(args.edge, timeout_s=args.edge_timeout)
    # A device has its link up long before a turn: do not time the handshakes.
    edge.warm_up(timeout_s=args.edge_timeout)
    online = None
    if args.online:
        from device_runtime.runtime.online import OnlineRouting, OnlineSettings

        online = OnlineRouting(params, OnlineSettings(track_gamma=not args.online_link_only))
    orch = Orchestrator(slm, policy, params, edge=edge, settings=OrchestratorSettings(
        max_tokens=args.max_tokens, temperature=0.0, seed=args.seed, system_prompt=args.system),
        hooks=[online] if online is not None else [])
    return orch, online


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m netlab.device_worker")
    p.add_argument("--edge", required=True)
    p.add_argument("--policy", required=True, help=f"{', '.join(POLICY_CHOICES)} or constant:P")
    p.add_argument("--profile")
    p.add_argument("--alpha", type=float)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--online", action="store_true", help="keep γ, B, δ current from each turn")
    p.add_argument("--online-link-only", action="store_true", help="with --online: keep γ, follow only B and δ")
    p.add_argument("--bundle")
    p.add_argument("--slm")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", help="system message before the first turn of each conversation")
    p.add_argument("--edge-timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    if args.policy not in POLICY_CHOICES and not args.policy.startswith("constant:"):
        p.error(f"unknown policy {args.policy!r}")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # llama.cpp may write to fd 1 from C: the protocol gets its own copy of
    # fd 1, and fd 1 itself goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    orch, online = build(args)

    def send(obj) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    send({"ready": True, "policy": args.policy, "online": online is not None})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            cmd = msg.get("cmd")
            if cmd == "quit":
                break
            if cmd == "new_conversation":
                orch.new_conversation()
                send({"ok": True})
            elif cmd == "turn":
                res = orch.turn(msg["prompt"])
                send({
                    "telemetry": res.telemetry.to_dict(),
                    "estimates": online.estimates if online is not None else None,
                    "comm_s": online.last_comm_s if online is not None else None,
                })
            else:
                send({"error": f"unknown cmd {cmd!r}"})
        except Exception as exc:  # noqa: BLE001 - reported to the driver, the worker lives on
            send({"error": f"{type(exc).__name__}: {exc}"})
    orch.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
