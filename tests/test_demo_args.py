"""demo / study arguments: every bad value fails at once with one line, before any training."""
import pytest

from tepo_jax import demo, study
from tepo_jax.errors import ConfigError
from tepo_jax.paths import PathError


@pytest.fixture
def no_training(monkeypatch):
    """Record what would train instead of training."""
    ran = []
    monkeypatch.setattr(demo, "train", lambda config: ran.append(config.workdir))
    return ran


@pytest.mark.parametrize("kw, message", [
    (dict(rl_steps=-3), "--rl-steps must be >= 0, got -3"),
    (dict(sft_steps=-5), "--sft-steps must be >= 0, got -5"),
    (dict(seed=-1), "--seed must be >= 0, got -1"),
])
def test_bad_numbers_fail_before_sft_runs(tmp_path, no_training, kw, message):
    with pytest.raises(ConfigError, match=message):
        demo.run_demo(tmp_path / "demo", **kw)
    assert no_training == []


def test_every_config_is_validated_before_sft_runs(tmp_path, no_training, monkeypatch):
    """An RL config the SFT config does not share fails before SFT, not after it."""
    make_rl = demo.rl_config

    def broken_rl(*a, **k):
        c = make_rl(*a, **k)
        c.rollout.group_size = 0
        return c
    monkeypatch.setattr(demo, "rl_config", broken_rl)
    with pytest.raises(ConfigError, match="config.rollout.group_size"):
        demo.run_demo(tmp_path / "demo")
    assert no_training == []


@pytest.mark.parametrize("sub", ["", "below"])
def test_a_workdir_that_is_a_file_is_refused(tmp_path, no_training, sub):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(PathError, match=r"--workdir .*afile.*a file, not a directory"):
        demo.run_demo(afile / sub if sub else afile)
    assert no_training == []


@pytest.mark.parametrize("script, argv, message", [
    ("demo", ["--sft-steps", "-5"], "error: --sft-steps must be >= 0, got -5"),
    ("demo", ["--workdir", "{afile}"], "error: --workdir {afile}: {afile} is a file, not a directory"),
    ("study", ["--seeds", "2", "--rl-steps", "-3"], "error: --rl-steps must be >= 0, got -3"),  # every seed first
    ("study", ["--seeds", "1", "--workdir", "{afile}"], "error: --workdir {afile}: {afile} is a file, not a directory"),
])
def test_main_prints_one_line_before_any_training(tmp_path, no_training, script, argv, message):
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = [a.format(afile=afile) for a in argv]
    if "--workdir" not in argv:
        argv += ["--workdir", str(tmp_path / script)]
    with pytest.raises(SystemExit) as e:
        {"demo": demo, "study": study}[script].main(argv)
    assert str(e.value) == message.format(afile=afile) and no_training == []


def test_demo_main_reports_a_user_error_from_training_in_one_line(tmp_path, monkeypatch):
    def fails(config):
        raise ConfigError("config.model.hf_checkpoint: no such checkpoint directory\nmore detail")
    monkeypatch.setattr(demo, "train", fails)
    with pytest.raises(SystemExit) as e:
        demo.main(["--workdir", str(tmp_path / "demo")])
    assert str(e.value) == "error: config.model.hf_checkpoint: no such checkpoint directory"


def test_a_runs_rl_time_is_its_steps_time_however_often_it_was_started(tmp_path):
    # From metrics.jsonl, not a timer around `train`: a finished run read back again, or a run
    # resumed after a kill, reports the time its RL steps took, not the last call's.
    from tepo_jax.runlog import RunLog

    assert demo.rl_step_seconds(tmp_path) is None                      # no metrics yet
    log = RunLog(tmp_path, tensorboard=False)
    log.write(1, "sft", {"sft/nll": 1.0})
    for step, seconds in ((1, 2.5), (2, 1.25), (3, 1.0)):
        log.write(step, "rl", {"time/step_s": seconds, "reward/score": 0.5})
        log.write(step, "eval", {"eval/accuracy": 0.5})
    assert demo.rl_step_seconds(tmp_path) == 4.75
