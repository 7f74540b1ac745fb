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
