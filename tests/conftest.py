"""Shared test setup.

Eight simulated CPU devices are configured before JAX is imported anywhere, so sharding tests
can build real meshes (data, fsdp, tensor) on a laptop or CI machine.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

# JAX's CPU backend starts now, so a run built in this session (Trainer, train) never applies
# `hostmem.retain_if_configured` to the whole test session, whichever test builds one first;
# tests/test_hostmem.py checks it in fresh processes.
jax.devices()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with `make test-slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def learning_run(tmp_path_factory):
    """test_train_driver.LEARNING run uninterrupted on local disk: the reference of the kill -9
    tests in tests/test_train_driver.py and tests/test_gcs.py, run once per session."""
    import subprocess

    from test_train_driver import LEARNING, ROOT, env, train_cmd

    straight = tmp_path_factory.mktemp("learning") / "straight"
    subprocess.run(train_cmd(straight, *LEARNING), cwd=ROOT, env=env(), check=True, capture_output=True)
    return straight
