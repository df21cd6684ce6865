"""Launch scripts: the exact commands of every --dry-run, and the local launcher for real."""
import importlib.util
import os
import shlex
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", os.path.join(LAUNCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu, gpu, local = _load("tpu"), _load("gpu"), _load("local")


def dry(module, argv, capsys) -> list[list[str]]:
    """Run a script's main with --dry-run; each printed line split back into its argv."""
    assert module.main(argv + ["--dry-run"] if "--" not in argv else
                       argv[:argv.index("--")] + ["--dry-run"] + argv[argv.index("--"):]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return [shlex.split(line) for line in lines]


def flag(cmd, name):
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
    assert len(values) == 1, (name, cmd)
    return values[0]


LOC = ["--name", "rl-pod", "--zone", "zone-a", "--project", "proj"]


def test_tpu_create_vm(capsys):
    (cmd,) = dry(tpu, ["create", *LOC, "--accelerator-type", "v5p-32", "--spot"], capsys)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "rl-pod"]
    assert flag(cmd, "--zone") == "zone-a" and flag(cmd, "--project") == "proj"
    assert flag(cmd, "--accelerator-type") == "v5p-32" and flag(cmd, "--version") == "v2-alpha-tpuv5"
    assert "--spot" in cmd and "--preemptible" not in cmd
    (cmd,) = dry(tpu, ["create", *LOC, "--accelerator-type", "v4-8", "--preemptible",
                       "--runtime-version", "custom-rt"], capsys)
    assert "--preemptible" in cmd and flag(cmd, "--version") == "custom-rt"


def test_tpu_create_queued_resource_waits_until_active(capsys):
    create, describe = dry(tpu, ["create", *LOC, "--accelerator-type", "v6e-16", "--queued", "--spot",
                                 "--valid-until-duration", "6h", "--wait"], capsys)
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "rl-pod"]
    assert flag(create, "--node-id") == "rl-pod" and flag(create, "--runtime-version") == "v2-alpha-tpuv6e"
    assert "--spot" in create and flag(create, "--valid-until-duration") == "6h"
    assert describe[3:6] == ["queued-resources", "describe", "rl-pod"]
    assert flag(describe, "--format") == "value(state.state)"
    with pytest.raises(SystemExit):  # queued resources have no --preemptible
        tpu.main(["create", *LOC, "--accelerator-type", "v5p-8", "--queued", "--preemptible", "--dry-run"])


def test_tpu_setup_copies_and_installs_on_all_workers(capsys):
    tar, scp, install = dry(tpu, ["setup", *LOC], capsys)
    assert tar[:2] == ["tar", "-czf"] and tar[tar.index("-C") + 1] == REPO and "--exclude=.venv" in tar
    assert scp[3:5] == ["tpu-vm", "scp"] and "--worker=all" in scp and scp[5] == tar[2]
    assert install[3:5] == ["tpu-vm", "ssh"] and "--worker=all" in install
    remote = flag(install, "--command")
    assert "tar -xzf tepo_jax.tar.gz -C tepo_jax" in remote
    assert shlex.split(remote)[-1] == ".[tpu]" and "pip install -q -e" in remote
    (clone,) = dry(tpu, ["setup", *LOC, "--git-url", "file:///srv/tepo_jax.git", "--git-ref", "v1",
                         "--no-sysdeps"], capsys)
    remote = flag(clone, "--command")
    assert "git clone -q file:///srv/tepo_jax.git tepo_jax" in remote and "checkout -q v1" in remote
    assert "apt-get" not in remote and "--worker=all" in clone


def test_tpu_run_starts_config_on_every_worker_with_quoted_overrides(capsys):
    (cmd,) = dry(tpu, ["run", *LOC, "--config", "configs/tepo_dense.py", "--env", "A=1", "--",
                       "--config.note=two words", "--config.rl.steps=3"], capsys)
    assert cmd[3:6] == ["tpu-vm", "ssh", "rl-pod"] and "--worker=all" in cmd
    remote = flag(cmd, "--command")
    words = shlex.split(remote)
    # the override with a space survives both quoting levels as one argument
    assert "--config.note=two words" in words and "--config.rl.steps=3" in words
    assert "--config=configs/tepo_dense.py" in words
    assert words[words.index("nohup") + 1:words.index("nohup") + 6] == [
        "env", "A=1", ".venv/bin/python", "-m", "tepo_jax.train"]
    # every worker joins jax.distributed (TPU metadata) before the overrides
    assert words.index("--distributed") == words.index("--config=configs/tepo_dense.py") + 1
    assert "logs/tepo_dense.log" in words and remote.endswith("echo $! > logs/tepo_dense.pid")
    assert remote.startswith("cd tepo_jax && ")


def test_tpu_run_passes_a_config_variant_and_names_the_run_after_it(capsys, monkeypatch):
    monkeypatch.chdir("/")  # a family file is checked in this checkout, wherever the command runs
    (cmd,) = dry(tpu, ["run", *LOC, "--config", "configs/tpu_v5p.py:llama31_8b_tepo_dense", "--",
                       "--config.train.steps=3"], capsys)
    words = shlex.split(flag(cmd, "--command"))
    assert words[words.index("--config=configs/tpu_v5p.py:llama31_8b_tepo_dense") + 1:][:2] == [
        "--distributed", "--config.train.steps=3"]
    assert "logs/tpu_v5p_llama31_8b_tepo_dense.log" in words
    (cmd,) = dry(tpu, ["run", *LOC, "--config", "configs/elsewhere.py:a=1,b=2"], capsys)  # not here: as given
    assert "--config=configs/elsewhere.py:a=1,b=2" in shlex.split(flag(cmd, "--command"))
    assert "logs/elsewhere_a_1_b_2.log" in shlex.split(flag(cmd, "--command"))


def test_tpu_run_gives_the_workers_a_gcs_workdir(capsys):
    (cmd,) = dry(tpu, ["run", *LOC, "--config", "configs/x.py", "--workdir", "gs://bkt/runs/a b", "--",
                       "--config.train.steps=3"], capsys)
    words = shlex.split(flag(cmd, "--command"))
    # the dry run prints it; it comes before the user's overrides, which may still change it
    assert words[words.index("--distributed") + 1:][:2] == ["--config.workdir=gs://bkt/runs/a b",
                                                           "--config.train.steps=3"]
    dry(tpu, ["run", *LOC, "--config", "configs/x.py"], capsys)
    with pytest.raises(SystemExit, match="a relative path is a different directory on each worker"):
        tpu.main(["run", *LOC, "--config", "configs/x.py", "--workdir", "runs/a", "--dry-run"])


@pytest.mark.parametrize("argv", [
    ["up", *LOC, "--accelerator-type", "v5p-64", "--config", "configs/tpu_v5p.py:qwen25_7b_ppo"],
    ["run", *LOC, "--config", "configs/tpu_v5p.py"],
])
def test_tpu_refuses_a_wrong_variant_before_anything_starts(argv, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(tpu.Runner, "run", lambda self, c, *a, **k: ran.append(c))
    with pytest.raises(SystemExit) as e:
        tpu.main(argv)
    assert str(e.value).startswith("error: configs/tpu_v5p.py") and "qwen25_7b_grpo, " in str(e.value)
    assert "\n" not in str(e.value) and ran == []


def test_tpu_up_is_create_setup_run(capsys):
    cmds = dry(tpu, ["up", *LOC, "--accelerator-type", "v5litepod-16", "--config", "configs/demo_cpu.py",
                     "--run-name", "exp1"], capsys)
    assert [c[4] for c in cmds if c[0] == "gcloud"] == ["create", "scp", "ssh", "ssh"]
    assert flag(cmds[0], "--version") == "v2-alpha-tpuv5-lite"
    assert "logs/exp1.log" in flag(cmds[-1], "--command")
    assert "--distributed" in shlex.split(flag(cmds[-1], "--command")) and "--worker=all" in cmds[-1]


def test_tpu_logs_stop_exec(capsys):
    (logs,) = dry(tpu, ["logs", *LOC, "--run-name", "exp1"], capsys)
    assert "--worker=0" in logs and flag(logs, "--command") == "tail -n 100 -F tepo_jax/logs/exp1.log"
    (stop,) = dry(tpu, ["stop", *LOC, "--run-name", "exp1"], capsys)
    # SIGINT, like SIGTERM, makes the driver checkpoint and exit (tests/test_train_driver.py)
    assert "--worker=all" in stop and "kill -INT $(cat tepo_jax/logs/exp1.pid)" in flag(stop, "--command")
    (stop,) = dry(tpu, ["stop", *LOC, "--run-name", "exp1", "--signal", "TERM"], capsys)
    assert "kill -TERM $(cat tepo_jax/logs/exp1.pid)" in flag(stop, "--command")
    (ex,) = dry(tpu, ["exec", *LOC, "--", "python3", "-c", "print('a b')"], capsys)
    assert shlex.split(flag(ex, "--command")) == ["python3", "-c", "print('a b')"]


def test_tpu_delete_asks_for_the_name(capsys, monkeypatch):
    (cmd,) = dry(tpu, ["delete", *LOC], capsys)
    assert cmd[3:6] == ["tpu-vm", "delete", "rl-pod"] and "--quiet" in cmd
    (cmd,) = dry(tpu, ["delete", *LOC, "--queued"], capsys)
    assert cmd[3:6] == ["queued-resources", "delete", "rl-pod"] and "--force" in cmd
    ran = []
    monkeypatch.setattr(tpu.Runner, "run", lambda self, c, *a, **k: ran.append(c))
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("rl-pod-typo\n"))
    assert tpu.main(["delete", *LOC]) == 1
    assert "Type the name" in capsys.readouterr().err and ran == []
    assert tpu.main(["delete", *LOC, "--confirm", "other"]) == 1 and ran == []
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("rl-pod\n"))
    assert tpu.main(["delete", *LOC]) == 0 and ran[0][3:6] == ["tpu-vm", "delete", "rl-pod"]


CONFIG = "configs/demo_cpu.py"   # the launchers on this machine check that their config exists


def test_gpu_launcher(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    (cmd,) = dry(gpu, ["--config", CONFIG, "--", "--config.note=a b"], capsys)
    assert cmd == [sys.executable, "-m", "tepo_jax.train", f"--config={CONFIG}", "--config.note=a b"]
    cmds = dry(gpu, ["--config", CONFIG, "--mode", "per-gpu", "--num-gpus", "4", "--port", "999"], capsys)
    assert len(cmds) == 4
    for i, cmd in enumerate(cmds):
        assert cmd[:2] == ["env", f"CUDA_VISIBLE_DEVICES={i}"]
        assert cmd[-3:] == ["--coordinator_address=127.0.0.1:999", "--num_processes=4", f"--process_id={i}"]
    with pytest.raises(SystemExit):
        gpu.main(["--config", CONFIG, "--mode", "per-gpu", "--dry-run"])


def test_gpu_launcher_passes_a_config_variant_and_refuses_a_wrong_one(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    cmds = dry(gpu, ["--config", "configs/gpu_qwen25.py:1p5b", "--mode", "per-gpu", "--num-gpus", "2"], capsys)
    assert [cmd[5] for cmd in cmds] == ["--config=configs/gpu_qwen25.py:1p5b"] * 2
    with pytest.raises(SystemExit) as e:
        gpu.main(["--config", "configs/gpu_qwen25.py:7b", "--dry-run"])
    assert str(e.value) == "error: configs/gpu_qwen25.py: unknown variant '7b'; the variants are 0p5b, 1p5b"
    assert capsys.readouterr().out == ""


def test_local_launcher_dry_run(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d")
    cmds = dry(local, ["--num-processes", "3", "--devices-per-process", "2", "--", f"--config={CONFIG}",
                       "--config.note=a b"], capsys)
    assert len(cmds) == 3
    for i, cmd in enumerate(cmds):
        assert cmd[:3] == ["env", "JAX_PLATFORMS=cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo"]
        assert cmd[3] == "XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2"
        assert cmd[4:] == [sys.executable, "-m", "tepo_jax.train", f"--config={CONFIG}", "--config.note=a b",
                           "--coordinator_address=127.0.0.1:12355", "--num_processes=3", f"--process_id={i}"]
    # deterministic: the same lines again
    assert dry(local, ["--num-processes", "3", "--devices-per-process", "2", "--", f"--config={CONFIG}",
                       "--config.note=a b"], capsys) == cmds


@pytest.mark.parametrize("script", ["tpu.py", "gpu.py", "local.py"])
def test_scripts_run_standalone(script):
    argv = {"tpu.py": ["delete", "--name", "n", "--zone", "z", "--dry-run"],
            "gpu.py": ["--config", os.path.join(REPO, CONFIG), "--dry-run"],
            "local.py": ["--dry-run", "--", f"--config={os.path.join(REPO, CONFIG)}"]}[script]
    out = subprocess.run([sys.executable, os.path.join(LAUNCH, script), *argv], capture_output=True, text=True,
                         check=True, cwd="/").stdout
    assert out.strip()


@pytest.mark.parametrize("argv, message", [
    (["--config", "configs/x.py", "--mode", "per-gpu", "--num-gpus", "-2"], "--num-gpus must be >= 1, got -2"),
    (["--config", "configs/x.py", "--mode", "per-gpu", "--num-gpus", "0"], "--num-gpus must be >= 1, got 0"),
    (["--config", "configs/x.py", "--mode", "per-gpu", "--num-gpus", "2", "--port", "70000"],
     "argument --port: must be 1-65535 (or 0: a free port), got 70000"),
])
def test_gpu_launcher_refuses_impossible_counts_and_ports(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        gpu.main(argv + ["--dry-run"])
    out = capsys.readouterr()
    assert e.value.code == 2 and message in out.err and out.out == ""


@pytest.mark.parametrize("argv, message", [
    (["--num-processes", "2"], "tepo_jax.train needs a config: -- --config=configs/X.py"),
    (["--num-processes", "2", "--", "--config.train.steps=3"], "tepo_jax.train needs a config"),
    (["--port", "70000", "--", "--config=configs/x.py"], "argument --port: must be 1-65535"),
    (["--port", "-1", "--", "--config=configs/x.py"], "argument --port: must be 1-65535"),
])
def test_local_launcher_refuses_no_config_and_bad_ports(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        local.main(argv[:argv.index("--")] + ["--dry-run"] + argv[argv.index("--"):] if "--" in argv
                   else argv + ["--dry-run"])
    out = capsys.readouterr()
    assert e.value.code == 2 and message in out.err and out.out == ""
    # a script brings its own arguments; `--config X` (two words) is a config too
    assert len(dry(local, ["--num-processes", "2", "--script", "x.py"], capsys)) == 2
    assert len(dry(local, ["--num-processes", "2", "--", "--config", CONFIG], capsys)) == 2


@pytest.mark.parametrize("launcher, argv", [
    ("gpu", ["--config", "configs/nope.py"]),
    ("gpu", ["--config", "configs/nope.py:0p5b", "--mode", "per-gpu", "--num-gpus", "2"]),
    ("local", ["--", "--config=configs/nope.py", "--config.train.steps=3"]),
    ("local", ["--", "--config", "configs/nope.py"]),
])
def test_launchers_on_this_machine_refuse_a_missing_config(launcher, argv, capsys, monkeypatch):
    # the job would run here, from this directory: the file is missing for it too
    monkeypatch.chdir(REPO)
    module = {"gpu": gpu, "local": local}[launcher]
    with pytest.raises(SystemExit) as e:
        module.main(argv[:argv.index("--")] + ["--dry-run"] + argv[argv.index("--"):] if "--" in argv
                    else argv + ["--dry-run"])
    assert str(e.value) == f"error: --config configs/nope.py: no such file (looked in {REPO})"
    assert capsys.readouterr().out == ""


def test_tpu_logs_refuses_a_negative_line_count(capsys):
    with pytest.raises(SystemExit) as e:
        tpu.main(["logs", *LOC, "--run-name", "exp1", "--lines", "-5", "--dry-run"])
    out = capsys.readouterr()
    assert e.value.code == 2 and "argument --lines: expected a whole number >= 0, got '-5'" in out.err
    assert out.out == ""


def test_tpu_up_refuses_a_config_the_tarball_would_not_have(capsys, monkeypatch):
    monkeypatch.chdir("/")  # the checkout is what gets copied, wherever the command runs
    ran = []
    monkeypatch.setattr(tpu.Runner, "run", lambda self, c, *a, **k: ran.append(c))
    argv = ["up", *LOC, "--accelerator-type", "v5p-32", "--config", "configs/nope.py:v", "--workdir", "gs://b/r"]
    with pytest.raises(SystemExit) as e:
        tpu.main(argv)
    assert str(e.value).startswith("error: --config configs/nope.py: no such file in this checkout")
    assert "\n" not in str(e.value) and ran == []
    monkeypatch.undo()
    # a clone (--git-url) may have it, and `run` uses whatever copy the workers already have
    assert len(dry(tpu, argv + ["--git-url", "https://example.com/r.git"], capsys)) == 3
    assert len(dry(tpu, ["run", *LOC, "--config", "configs/nope.py", "--workdir", "gs://b/r"], capsys)) == 1


PROBE = textwrap.dedent("""
    import argparse, os
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from tepo_jax.sharding import initialize_distributed
    p = argparse.ArgumentParser()
    for f in ("--coordinator_address", "--num_processes", "--process_id"):
        p.add_argument(f)
    p.add_argument("--tag")
    a = p.parse_args()
    initialize_distributed(a.coordinator_address, int(a.num_processes), int(a.process_id))
    ids = multihost_utils.process_allgather(np.array([jax.process_index()]))  # a gloo collective
    line = (f"{a.tag} process {jax.process_index()} devices {jax.device_count()} local "
            f"{jax.local_device_count()} gathered {sorted(ids.ravel().tolist())}\\n")
    # One write: gloo's threads print to the same stdout, and may do so mid-line of a print().
    os.write(1, line.encode())
""")


def test_local_launcher_really_runs_two_jax_processes(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": REPO}
    res = subprocess.run([sys.executable, os.path.join(LAUNCH, "local.py"), "--num-processes", "2",
                          "--devices-per-process", "2", "--port", "0", "--script", str(probe), "--timeout", "120",
                          "--", "--tag", "hello world"], capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    for i in range(2):   # each process's line, under its own prefix (gloo's lines may share it)
        mine = [ln for ln in res.stdout.splitlines() if ln.startswith(f"[{i}] ")]
        assert any(f"hello world process {i} devices 4 local 2 gathered [0, 1]" in ln for ln in mine), res.stdout


def test_local_launcher_propagates_failure_and_stops_the_others(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys, time\n"
                      "if '--process_id=1' in sys.argv: sys.exit(3)\n"
                      "time.sleep(60)\n")
    start = time.monotonic()
    res = subprocess.run([sys.executable, os.path.join(LAUNCH, "local.py"), "--num-processes", "2", "--port", "0",
                          "--script", str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and "process 1 exited with 3" in res.stderr
    assert time.monotonic() - start < 30
