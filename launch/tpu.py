#!/usr/bin/env python3
"""TPU VM / pod slice lifecycle with gcloud: create, setup, run, logs, stop, delete (and `up` = all
of create, setup, run). Every subcommand takes --dry-run and then prints the exact commands.

    python launch/tpu.py up --name my-v5p --zone Z --accelerator-type v5p-32 --spot \
        --config configs/tpu_v5p.py:qwen25_7b_grpo --workdir gs://my-bucket/runs/grpo \
        -- --config.train.steps=1000
    python launch/tpu.py logs   --name my-v5p --zone Z --run-name tpu_v5p_qwen25_7b_grpo
    python launch/tpu.py stop   --name my-v5p --zone Z --run-name tpu_v5p_qwen25_7b_grpo
    python launch/tpu.py delete --name my-v5p --zone Z          # asks you to type the name

Every worker gets the same project copy (a tarball of this checkout, or a git clone) installed
with `pip install -e .[tpu]` into `<remote-dir>/.venv`, and runs the same command
(`--worker=all`) with `--distributed`: `jax.distributed.initialize()` then finds the other hosts
from the TPU metadata. The workers of a slice share no filesystem: `--workdir gs://bucket/run`
is where the run keeps checkpoints, metrics and traces (passed as `--config.workdir`; every
worker reads and writes it; a restarted run resumes from it). A run writes
`<remote-dir>/logs/<run>.log` and `<run>.pid` on every worker. `stop` sends SIGINT (or --signal TERM): the driver finishes its step, checkpoints and
exits (code 130 / 143); `run` again resumes from that checkpoint.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO_DIR, Runner, add_dry_run, check_config  # noqa: E402

GCLOUD_TPU = ["gcloud", "compute", "tpus"]
# Runtime (software) versions by accelerator generation.
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                    "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}


def default_runtime(accelerator_type: str) -> str:
    generation = accelerator_type.split("-")[0]
    if generation not in RUNTIME_VERSIONS:
        raise SystemExit(f"no default runtime version for {accelerator_type!r}; pass --runtime-version")
    return RUNTIME_VERSIONS[generation]


def _location(args) -> list[str]:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def ssh(args, remote: str, worker: str = "all") -> list[str]:
    return [*GCLOUD_TPU, "tpu-vm", "ssh", args.name, *_location(args), f"--worker={worker}",
            f"--command={remote}"]


# ---- create -------------------------------------------------------------------------------------

def create_commands(args) -> list[list[str]]:
    runtime = args.runtime_version or default_runtime(args.accelerator_type)
    if args.queued:
        if args.preemptible:
            raise SystemExit("queued resources take --spot, not --preemptible")
        cmd = [*GCLOUD_TPU, "queued-resources", "create", args.name, f"--node-id={args.name}",
               *_location(args), f"--accelerator-type={args.accelerator_type}",
               f"--runtime-version={runtime}"]
        cmd += ["--spot"] * args.spot + ["--reserved"] * args.reserved
        if args.valid_until_duration:
            cmd.append(f"--valid-until-duration={args.valid_until_duration}")
        return [cmd]
    if args.reserved or args.valid_until_duration:
        raise SystemExit("--reserved / --valid-until-duration need --queued")
    cmd = [*GCLOUD_TPU, "tpu-vm", "create", args.name, *_location(args),
           f"--accelerator-type={args.accelerator_type}", f"--version={runtime}"]
    return [cmd + ["--spot"] * args.spot + ["--preemptible"] * args.preemptible]


def wait_active(runner: Runner, args, poll_s: float = 30.0) -> None:
    """Poll a queued resource until ACTIVE (its TPU VM exists then)."""
    cmd = [*GCLOUD_TPU, "queued-resources", "describe", args.name, *_location(args),
           "--format=value(state.state)"]
    while True:
        state = runner.output(cmd).strip()
        if runner.dry_run or state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise SystemExit(f"queued resource {args.name} is {state}")
        print(f"queued resource {args.name}: {state or 'unknown'}; waiting", file=sys.stderr)
        time.sleep(poll_s)


def do_create(args, runner: Runner) -> int:
    for cmd in create_commands(args):
        runner.run(cmd)
    if args.queued and args.wait:
        wait_active(runner, args)
    return 0


# ---- setup --------------------------------------------------------------------------------------

def setup_commands(args) -> list[list[str]]:
    d = shlex.quote(args.remote_dir)
    install = (f"cd {d} && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && "
               f".venv/bin/pip install -q -e {shlex.quote('.[' + args.extras + ']')}")
    sysdeps = "sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv bubblewrap"
    cmds = []
    if args.git_url:
        fetch = f"rm -rf {d} && git clone -q {shlex.quote(args.git_url)} {d}"
        if args.git_ref:
            fetch += f" && git -C {d} checkout -q {shlex.quote(args.git_ref)}"
    else:
        tarball = f"/tmp/tepo_jax-{args.name}.tar.gz"
        cmds.append(["tar", "-czf", tarball, "--exclude=.git", "--exclude=.venv", "--exclude=__pycache__",
                     "--exclude=*.egg-info", "-C", REPO_DIR, "."])
        cmds.append([*GCLOUD_TPU, "tpu-vm", "scp", tarball, f"{args.name}:tepo_jax.tar.gz", *_location(args),
                     "--worker=all"])
        fetch = f"rm -rf {d} && mkdir -p {d} && tar -xzf tepo_jax.tar.gz -C {d}"
    steps = ([] if args.no_sysdeps else [sysdeps]) + [fetch, install]
    cmds.append(ssh(args, " && ".join(steps)))
    return cmds


def do_setup(args, runner: Runner) -> int:
    for cmd in setup_commands(args):
        runner.run(cmd)
    return 0


# ---- run / logs / stop --------------------------------------------------------------------------

def run_name(args) -> str:
    """--run-name, else the config's name: configs/X.py -> X, configs/X.py:VARIANT -> X_VARIANT."""
    if args.run_name:
        return args.run_name
    path, _, variant = args.config.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return f"{name}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', variant)}" if variant else name


def run_commands(args) -> list[list[str]]:
    name = run_name(args)
    env = ["env", *args.env] if args.env else []
    # --distributed: one JAX process per worker, joined through the TPU metadata.
    workdir = [f"--config.workdir={args.workdir}"] if args.workdir else []
    train = [*env, ".venv/bin/python", "-m", args.module, f"--config={args.config}", "--distributed",
             *workdir, *args.overrides]
    log, pid = shlex.quote(f"logs/{name}.log"), shlex.quote(f"logs/{name}.pid")
    remote = (f"cd {shlex.quote(args.remote_dir)} && mkdir -p logs && "
              f"nohup {shlex.join(train)} > {log} 2>&1 < /dev/null & echo $! > {pid}")
    return [ssh(args, remote)]


def check_workdir(workdir: str | None) -> None:
    """A workdir that is neither a URL nor absolute cannot be one place for every worker."""
    if workdir is None:
        print("note: no --workdir; the config's workdir is used. The workers of a multi-host slice "
              "share no disk: give --workdir gs://BUCKET/RUN (or a path on a shared mount)", file=sys.stderr)
    elif "://" not in workdir and not workdir.startswith("/"):
        raise SystemExit(f"--workdir {workdir}: a relative path is a different directory on each worker; "
                         "give gs://BUCKET/RUN (or an absolute path on a shared mount)")


def do_run(args, runner: Runner) -> int:
    for cmd in run_commands(args):
        runner.run(cmd)
    return 0


def logs_commands(args) -> list[list[str]]:
    log = shlex.quote(f"{args.remote_dir}/logs/{args.run_name}.log")
    follow = "" if args.no_follow else " -F"
    return [ssh(args, f"tail -n {args.lines}{follow} {log}", worker=args.worker)]


def stop_commands(args) -> list[list[str]]:
    pid = shlex.quote(f"{args.remote_dir}/logs/{args.run_name}.pid")
    # Only the pid this launcher recorded; INT and TERM let the driver checkpoint before it exits.
    return [ssh(args, f"test -f {pid} && kill -{args.signal} $(cat {pid}) ; rm -f {pid}")]


def exec_commands(args) -> list[list[str]]:
    return [ssh(args, shlex.join(args.remote), worker=args.worker)]


# ---- delete -------------------------------------------------------------------------------------

def delete_commands(args) -> list[list[str]]:
    if args.queued:
        return [[*GCLOUD_TPU, "queued-resources", "delete", args.name, *_location(args), "--force", "--quiet"]]
    return [[*GCLOUD_TPU, "tpu-vm", "delete", args.name, *_location(args), "--quiet"]]


def confirm_delete(args) -> bool:
    """The name must be typed (or passed with --confirm): a deleted slice and its disks are gone."""
    typed = args.confirm
    if typed is None:
        print(f"This deletes TPU {args.name!r} in {args.zone} and everything on its disks.\n"
              f"Type the name to confirm: ", end="", file=sys.stderr, flush=True)
        typed = sys.stdin.readline().strip()
    if typed != args.name:
        print(f"name does not match ({typed!r} != {args.name!r}); nothing deleted", file=sys.stderr)
        return False
    return True


def do_delete(args, runner: Runner) -> int:
    if not runner.dry_run and not confirm_delete(args):
        return 1
    for cmd in delete_commands(args):
        runner.run(cmd)
    return 0


def do_up(args, runner: Runner) -> int:
    args.wait = True
    do_create(args, runner)
    do_setup(args, runner)
    return do_run(args, runner)


def _simple(builder):
    def do(args, runner):
        for cmd in builder(args):
            runner.run(cmd)
        return 0
    return do


# ---- arguments ----------------------------------------------------------------------------------

def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _common(p):
    p.add_argument("--name", required=True, help="TPU VM (node) name; also the queued resource id")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--remote-dir", default="tepo_jax", help="project directory on the workers (under ~)")
    add_dry_run(p)


def _create_flags(p):
    p.add_argument("--accelerator-type", required=True, help="e.g. v4-8, v5litepod-16, v5p-32, v6e-8")
    p.add_argument("--runtime-version", default=None, help="default by generation: " + str(RUNTIME_VERSIONS))
    p.add_argument("--spot", action="store_true", help="spot capacity (can be preempted)")
    p.add_argument("--preemptible", action="store_true", help="preemptible TPU VM (not with --queued)")
    p.add_argument("--queued", action="store_true", help="create through a queued resource")
    p.add_argument("--reserved", action="store_true", help="queued: use reserved capacity")
    p.add_argument("--valid-until-duration", default=None, help="queued: give up after e.g. 6h")
    p.add_argument("--wait", action="store_true", help="queued: wait until the slice is ACTIVE")


def _setup_flags(p):
    p.add_argument("--git-url", default=None, help="clone this instead of copying a tarball of the checkout")
    p.add_argument("--git-ref", default=None)
    p.add_argument("--extras", default="tpu", help="pip extras to install (.[EXTRAS])")
    p.add_argument("--no-sysdeps", action="store_true", help="skip apt-get python3-venv/bubblewrap")


def _run_flags(p):
    p.add_argument("--config", required=True, help="experiment config (a path in the project copy on the workers), "
                                                   "e.g. configs/X.py or configs/X.py:VARIANT")
    p.add_argument("--run-name", default=None, help="log/pid file name (default: the config's name, "
                                                    "X or X_VARIANT)")
    p.add_argument("--module", default="tepo_jax.train", help="python -m MODULE; it gets --distributed "
                                                              "(tepo_jax.train accepts it)")
    p.add_argument("--workdir", default=None, metavar="gs://BUCKET/RUN",
                   help="the run's workdir, shared by all workers: a gs:// URL (the workers share no "
                        "disk), or a path on a shared mount; default: the config's")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment for the driver")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="-- then --config.field=value ...")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    specs = {
        "create": ([_create_flags], do_create),
        "setup": ([_setup_flags], do_setup),
        "run": ([_run_flags], do_run),
        "up": ([_create_flags, _setup_flags, _run_flags], do_up),
    }
    for name, (adders, func) in specs.items():
        p = sub.add_parser(name)
        _common(p)
        for add in adders:
            add(p)
        p.set_defaults(func=func)
    p = sub.add_parser("logs", help="stream a run's log (process 0 logs; --worker to pick another)")
    _common(p)
    p.add_argument("--run-name", required=True)
    p.add_argument("--worker", default="0")
    p.add_argument("--lines", type=_non_negative, default=100, help="lines of the log to show first")
    p.add_argument("--no-follow", action="store_true")
    p.set_defaults(func=_simple(logs_commands))
    p = sub.add_parser("stop", help="signal a run on every worker (its recorded pid)")
    _common(p)
    p.add_argument("--run-name", required=True)
    p.add_argument("--signal", default="INT", help="INT (default) or TERM: checkpoint and exit; KILL: at once")
    p.set_defaults(func=_simple(stop_commands))
    p = sub.add_parser("exec", help="run a shell command on the workers")
    _common(p)
    p.add_argument("--worker", default="all")
    p.add_argument("remote", nargs=argparse.REMAINDER, help="-- then the command")
    p.set_defaults(func=_simple(exec_commands))
    p = sub.add_parser("delete", help="delete the TPU VM (or queued resource); asks for the name")
    _common(p)
    p.add_argument("--queued", action="store_true")
    p.add_argument("--confirm", default=None, metavar="NAME", help="the name again, instead of the prompt")
    p.set_defaults(func=do_delete)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for field in ("overrides", "remote"):
        value = getattr(args, field, None)
        if value and value[0] == "--":
            setattr(args, field, value[1:])
    if getattr(args, "config", None):
        # before a slice is created for a config that cannot start; `up` without --git-url
        # ships a tarball of this checkout to the workers
        check_config(args.config, REPO_DIR, shipped=args.command == "up" and not args.git_url)
        check_workdir(args.workdir)
    return args.func(args, Runner(args.dry_run))


if __name__ == "__main__":
    sys.exit(main())
