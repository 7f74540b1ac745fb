import os
import subprocess
import sys

import pytest

from vla.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ["collect", "train", "eval", "plan", "serve", "dataset", "bench"]:
        assert name in SUBCOMMANDS
        assert f"  {name}" in out


def test_unknown_subcommand_is_refused(capsys):
    assert main(["fly"]) == 2
    err = capsys.readouterr().err
    assert "unknown subcommand 'fly'" in err and "collect" in err


def test_unknown_benchmark_is_refused(capsys):
    assert main(["bench", "warp"]) == 2
    assert "unknown benchmark 'warp'" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "vla", "--help"], capture_output=True, text=True, check=True)
    assert "subcommands:" in out.stdout


def test_bad_override_is_a_clear_error():
    from vla.config import compose

    with pytest.raises(ValueError, match="no_such_key"):
        compose("train", ["no_such_key.nested=1"])


def test_output_closed_early_is_not_an_error():
    # `vla ... | head -1` must not end in a BrokenPipeError traceback: write into a pipe whose
    # reading end is already closed.
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([sys.executable, "-m", "vla", "--help"], stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_keys_that_moved_into_the_policy_group_keep_their_old_spelling():
    from vla.config import compose

    cfg = compose("eval", ["checkpoint=runs/a", "n_action_steps=4", "seed=7", "max_steps=30"])
    assert (cfg.policy.name, cfg.policy.checkpoint) == ("vla", "runs/a")
    assert (cfg.policy.n_action_steps, cfg.policy.seed) == (4, 7)
    assert cfg.max_episode_steps == 30 and "max_steps" not in cfg
    expert = compose("eval", ["policy=expert", "env=metaworld"])
    assert dict(expert.policy) == {"name": "expert"}
    plan = compose("plan", ["checkpoint=runs/a", "seed=3", "num_flow_steps=5"])
    assert (plan.policy.checkpoint, plan.policy.num_flow_steps, plan.seed, plan.policy.seed) == ("runs/a", 5, 3, 0)
    serve = compose("serve", ["checkpoint=runs/a", "port=9000", "policy.n_action_steps=2"])
    assert (serve.policy.checkpoint, serve.port, serve.policy.n_action_steps) == ("runs/a", 9000, 2)
    remote = compose("eval", ["policy=remote", "policy.port=9001"])
    assert (remote.policy.name, remote.policy.port) == ("remote", 9001)


def test_version_and_exit_codes(capsys, monkeypatch):
    import types

    import vla
    from vla import cli

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == vla.__version__
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out and all(f"  {code:<9} " in out for code in cli.EXIT_CODES)

    def crash(argv):
        raise RuntimeError("boom")

    def bad_path(argv):
        raise FileNotFoundError("no such store: x.zarr")

    monkeypatch.delenv("VLA_DEBUG", raising=False)
    for fn, code, text in ((crash, 3, "RuntimeError: boom"), (bad_path, 2, "error: no such store: x.zarr")):
        monkeypatch.setattr(cli.importlib, "import_module", lambda name, fn=fn: types.SimpleNamespace(main=fn))
        assert main(["plan"]) == code
        assert text in capsys.readouterr().err


def test_runtime_defaults_leave_the_openmp_wait_policy_to_the_runtime(monkeypatch):
    """A forced OMP_WAIT_POLICY=PASSIVE made small kernels 3-4x slower on 2 cores: the CLI must not set it,
    and must keep a user's own choice (BENCHMARKS.md, "OpenMP wait policy")."""
    from vla import cli

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    cli._set_runtime_defaults()
    assert "OMP_WAIT_POLICY" not in os.environ
    assert os.environ["MUJOCO_GL"] == "egl"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    cli._set_runtime_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["MUJOCO_GL"] == "osmesa"
