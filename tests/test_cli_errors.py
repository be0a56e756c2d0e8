"""A bad config value on the command line ends `fer-train` with one line naming the key, and exit code 2."""

from __future__ import annotations

import subprocess

import pytest

from conftest import REPO, cli_env, fer_train_cmd


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # resolved while Hydra sets the run directory up, before the entry point runs
        ("resume=no_such_run", "error: resume=no_such_run: neither a run directory nor a run name under "),
        # raised inside Hydra's instantiate of the data module
        ("data.augment.brightness=2", "error: data.augment.brightness=2: expected a value in [0, 1]"),
    ],
)
def test_bad_config_values_are_one_line_errors(tmp_path, override, expected):
    proc = subprocess.run(fer_train_cmd(override), capture_output=True, text=True, cwd=REPO, env=cli_env(tmp_path),
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-3000:]
