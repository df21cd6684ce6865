#!/usr/bin/env python3
"""Multi-GPU single-host launcher.

Two modes:
- `--mode host` (default): one process that uses every local GPU (the usual JAX setup):
      python -m tepo_jax.train --config=configs/X.py ...
- `--mode per-gpu --num-gpus N`: N processes, process i sees only GPU i
  (CUDA_VISIBLE_DEVICES=i) and joins the others through jax.distributed:
      env CUDA_VISIBLE_DEVICES=i python -m tepo_jax.train ... \
          --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i
  Output is prefixed with [i]; the first failure stops the others and sets the exit code.

    python launch/gpu.py --config configs/gpu_qwen25.py:0p5b -- --config.train.steps=100
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Runner, add_dry_run, check_config, coordinator_flags, free_port,  # noqa: E402
                     port_arg, run_group)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="experiment config file, e.g. configs/X.py or "
                                                   "configs/X.py:VARIANT")
    p.add_argument("--mode", choices=("host", "per-gpu"), default="host")
    p.add_argument("--num-gpus", type=int, default=None, help="per-gpu mode: number of GPUs (processes)")
    p.add_argument("--port", type=port_arg, default=12356, help="per-gpu mode: coordinator port; 0 = a free one")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--module", default="tepo_jax.train")
    p.add_argument("--mem-fraction", default=None,
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION for every process (JAX's default is 0.75)")
    add_dry_run(p)
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="-- then --config.field=value ...")
    args = p.parse_args(argv)
    if args.overrides and args.overrides[0] == "--":
        args.overrides = args.overrides[1:]
    if args.num_gpus is not None and args.num_gpus < 1:
        p.error(f"--num-gpus must be >= 1, got {args.num_gpus}")
    if args.mode == "per-gpu" and not args.num_gpus:
        p.error("--mode per-gpu needs --num-gpus")
    return args


def base_command(args) -> list[str]:
    return [args.python, "-m", args.module, f"--config={args.config}", *args.overrides]


def main(argv=None) -> int:
    args = parse_args(argv)
    check_config(args.config, os.getcwd(), runs_here=True)
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": args.mem_fraction} if args.mem_fraction else {}
    if args.mode == "host":
        return Runner(args.dry_run).run(base_command(args), env or None, check=False)
    port = args.port or (12356 if args.dry_run else free_port())
    address = f"127.0.0.1:{port}"
    cmds = [base_command(args) + coordinator_flags(address, args.num_gpus, i) for i in range(args.num_gpus)]
    envs = [{"CUDA_VISIBLE_DEVICES": str(i), **env} for i in range(args.num_gpus)]
    return run_group(cmds, envs, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
