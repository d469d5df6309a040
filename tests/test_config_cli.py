"""Settings precedence (file < env < flags), their errors, and the CLI's one-line exit-2 contract."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tokenfab.config import ConfigError, load_settings


def test_precedence_file_env_cli(tmp_path):
    f = tmp_path / "tokenfab.yaml"
    f.write_text("server:\n  port: 9001\n  host: 0.0.0.0\nengine:\n  dtype: float32\n  max_num_seqs: 8\n")
    s = load_settings(str(f), cli={"max_num_seqs": "4"}, env={"TOKENFAB_PORT": "9002"})
    assert s.server.port == 9002 and s.server.host == "0.0.0.0"
    assert s.engine.dtype == "float32" and s.engine.max_num_seqs == 4


def test_defaults_without_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings(None, env={})
    assert s.server.port == 8000 and s.engine.model == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    "text,needle",
    [
        ("engine:\n  max_num_seqs: lots\n", "engine.max_num_seqs: expected int"),
        ("engine:\n  warp_speed: 9\n", "unknown key engine.warp_speed"),
        ("engine:\n  int8_max_tokens: 8\n", "engine.int8_max_tokens is now called engine.small_batch_max_tokens"),
        ("server: [1, 2]\n", "must be a mapping"),
        ("server:\n  port: [\n", "not valid YAML"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_settings(str(f), env={})


def test_bad_env_value():
    with pytest.raises(ConfigError, match="TOKENFAB_PORT: expected int"):
        load_settings(None, env={"TOKENFAB_PORT": "eighty"})


def test_example_config_is_valid():
    s = load_settings("tokenfab.example.yaml", env={})
    assert s.engine.model == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["serve", "--port", "abc"], "--port: expected int"),
        (["serve", "--config", "/nonexistent.yaml"], "does not exist"),
        (["serve", "--model", "/no/such/model"], "not found"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_usage_errors_are_one_line_exit_2(args, needle, tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}  # the default ledger goes to a fresh data directory
    r = subprocess.run([sys.executable, "-m", "tokenfab.cli", *args], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=env)
    assert r.returncode == 2
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_keys_and_usage_name_one_ledger_from_any_directory(tmp_path):
    """The default ledger lives in the data directory, not the working one, and every command names it."""
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    env.pop("TOKENFAB_LEDGER_URL", None)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    def cli(*args, cwd):
        return subprocess.run([sys.executable, "-m", "tokenfab.cli", *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path / cwd, env=env)

    first = cli("keys", "create", "--tenant", "acme", "--tier", "fast", "--budget-usd", "5", cwd="a")
    assert first.returncode == 0, first.stderr
    expected = f"ledger: sqlite:///{tmp_path / 'data' / 'tokenfab' / 'ledger.db'}"
    assert expected in first.stderr and "budget $5" in first.stdout
    again = cli("keys", "create", "--tenant", "acme", "--tier", "fast", cwd="b")
    assert again.returncode == 0, again.stderr
    # the same tenant, found from another directory; its existing budget is the one that applies
    assert "existing tenant acme" in again.stdout and "budget $5" in again.stdout and "no budget limit" not in again.stdout
    listed = cli("keys", "list", cwd="b")
    assert expected in listed.stderr and listed.stdout.count("acme") == 2
    bad = cli("usage", "--limit", "-1", cwd="b")
    assert bad.returncode == 2 and "--limit must be at least 1" in bad.stderr
