"""The `long` run of `ConversationMachine`, in chunks, by hand (docs/testing.md).

`HYPOTHESIS_PROFILE=long pytest tests/testing/test_convergence.py -s` says nothing until it
ends, and one process runs on one core. This runs the `long` profile's settings in chunks of
`--chunk` examples, each with its own seed (`--seed` times 1,000 plus the chunk's number,
so parallel processes started with different `--seed`s draw different runs), and prints after
each chunk the machine's own counts (`ConversationMachine.runs`, `.steps_taken`), the time and
the load, until `--steps` steps have run or `--until` (Unix time) has passed. A failure is
shrunk as under `long`, printed, kept in the example database, and ends the process with 1.

    nice -n 5 .venv/bin/python -m tests.testing.long_run --seed 1 --steps 35000 > long-1.log

`--topology nodes` runs the relay as a cluster of nodes only
(tests/testing/test_cluster_machine.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import hypothesis.core
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from crdtchat.testing import ConversationMachine
from crdtchat.testing.profiles import register_profiles
from tests.support import REPO


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--chunk", type=int, default=100, help="examples per chunk")
    parser.add_argument("--steps", type=int, default=35_000, help="stop after this many steps")
    parser.add_argument("--until", type=float, default=float("inf"), help="stop after (Unix)")
    parser.add_argument(
        "--topology", choices=("all", "nodes"), default="all", help="nodes: relay nodes only"
    )
    args = parser.parse_args(argv)
    machine: type[ConversationMachine] = ConversationMachine
    if args.topology == "nodes":
        machine = type("ClusterNodesMachine", (ConversationMachine,), {"topologies": ("nodes",)})
    register_profiles(REPO / ".hypothesis" / "examples")
    chunk_settings = settings(settings.get_profile("long"), max_examples=args.chunk)
    started = time.monotonic()
    chunk = 0
    print(f"seed {args.seed}, chunks of {args.chunk} examples, pid {os.getpid()}", flush=True)
    while ConversationMachine.steps_taken < args.steps and time.time() < args.until:
        chunk += 1
        hypothesis.core.global_force_seed = args.seed * 1000 + chunk
        try:
            run_state_machine_as_test(machine, settings=chunk_settings)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED in chunk {chunk}", flush=True)
            report(chunk, started)
            return 1
        report(chunk, started)
    print("DONE", flush=True)
    return 0


def report(chunk: int, started: float) -> None:
    """One line of the machine's own counts so far."""
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"chunk {chunk}: {ConversationMachine.runs} examples, "
        f"{ConversationMachine.steps_taken} steps, {time.monotonic() - started:.0f} s, "
        f"load {load}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
