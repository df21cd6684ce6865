#!/usr/bin/env python3
"""N JAX processes on this machine, for CPU testing of multi-host code.

    python launch/local.py --num-processes 2 --devices-per-process 4 -- \
        --config=configs/demo_cpu.py --config.train.steps=3

starts `python -m tepo_jax.train <args> --coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=i` N times, each with XLA_FLAGS simulating D CPU devices and gloo CPU collectives,
waits for all, and exits with the first failure's code (stopping the others).
`--script file.py` runs a script instead of the module. `--port 0` picks a free port.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (add_dry_run, check_config, config_flag, coordinator_flags, free_port,  # noqa: E402
                     port_arg, run_group)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=4)
    p.add_argument("--port", type=port_arg, default=12355, help="coordinator port; 0 = a free port")
    p.add_argument("--python", default=sys.executable, help="interpreter for the processes")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--module", default="tepo_jax.train", help="python -m MODULE (default tepo_jax.train)")
    target.add_argument("--script", default=None, help="run this python file instead of --module")
    p.add_argument("--timeout", type=float, default=None, help="seconds before all processes are stopped")
    add_dry_run(p)
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the arguments for every process")
    args = p.parse_args(argv)
    if args.args and args.args[0] == "--":
        args.args = args.args[1:]
    if args.num_processes < 1 or args.devices_per_process < 1:
        p.error("--num-processes and --devices-per-process must be >= 1")
    if not args.script and args.module == "tepo_jax.train" and not config_flag(args.args):
        p.error("tepo_jax.train needs a config: -- --config=configs/X.py [--config.a.b=v ...]")
    return args


def xla_flags(devices: int, inherited: str = "") -> str:
    """The inherited XLA_FLAGS with the host device count replaced."""
    kept = re.sub(r"--xla_force_host_platform_device_count=\S+", "", inherited).split()
    return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])


def commands(args, port: int):
    target = [args.script] if args.script else ["-m", args.module]
    env = {"JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           "XLA_FLAGS": xla_flags(args.devices_per_process, os.environ.get("XLA_FLAGS", ""))}
    address = f"127.0.0.1:{port}"
    cmds = [[args.python, *target, *args.args, *coordinator_flags(address, args.num_processes, i)]
            for i in range(args.num_processes)]
    return cmds, [env] * args.num_processes


def main(argv=None) -> int:
    args = parse_args(argv)
    if config_flag(args.args):   # the processes run here, from this directory
        check_config(config_flag(args.args), os.getcwd(), runs_here=True)
    port = args.port or (12355 if args.dry_run else free_port())
    cmds, envs = commands(args, port)
    return run_group(cmds, envs, args.dry_run, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
