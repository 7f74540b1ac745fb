"""The `vla` command: ``vla SUBCOMMAND [hydra overrides ...]``.

Each subcommand lives in ``vla.commands.<name>`` and exposes ``main(argv) -> int``; it is
imported only when run, so ``vla --help`` stays fast and heavy dependencies load on demand.
``vla --version`` prints the version. Exit codes (:data:`EXIT_CODES`, for scripts): 0 done; 1 the
command ran but did not get what was asked (``vla dataset verify`` found damage, ``vla collect``
kept fewer episodes than asked for, a ``vla train -m`` job failed); 2 bad input (unknown
subcommand, config override, path or data; one line on stderr); 3 an unexpected error (a bug or a
broken environment; the traceback is printed); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import importlib
import os
import sys

SUBCOMMANDS: dict[str, str] = {
    "collect": "collect demonstrations with scripted experts into a Zarr store",
    "train": "train a policy from a Zarr store (one loop for every model variant)",
    "eval": "closed-loop rollouts: per-task success, eval_info.json, videos, chart",
    "plan": "decode the subtask plan for an instruction in a scene",
    "serve": "serve a trained policy over websocket + msgpack",
    "dataset": "inspect or verify a store: `vla dataset {info,verify} PATH [--repair]`",
    "report": "one Markdown table + chart from many runs' evaluations (sweeps, ablations)",
    "bench": "benchmarks printing JSON: `vla bench {dataloader,env,inference,train,eval,serve}`",
}

EXIT_CODES: dict[int, str] = {
    0: "done",
    1: "ran, but did not get what was asked (verify found damage, fewer episodes, a failed sweep job)",
    2: "bad input: unknown subcommand, config override, path or data (one line on stderr)",
    3: "unexpected error (a bug or a broken environment; traceback on stderr)",
    130: "interrupted (Ctrl-C)",
}

USAGE = "usage: vla SUBCOMMAND [ARGS | hydra overrides key=value ...]\n       vla --version\n\nsubcommands:\n" + (
    "\n".join(f"  {name:<9} {text}" for name, text in SUBCOMMANDS.items())
) + "\n\nexit codes:\n" + "\n".join(f"  {code:<9} {text}" for code, text in EXIT_CODES.items()) + (
    "\n\nRun `vla SUBCOMMAND --help` for the subcommand's options and config.")


def _set_runtime_defaults() -> None:
    # OpenMP's wait policy is left to the runtime (its threads spin briefly after a parallel region,
    # then sleep; fewer spins when threads outnumber cores). Forcing PASSIVE made every small kernel
    # wake its threads from sleep: on 2 cores the tiny chunk took 27-35 ms instead of 8-9, a training
    # step ~1.3x longer and a one-env evaluation ~1.9x slower (BENCHMARKS.md, "OpenMP wait policy").
    # Headless rendering: EGL works out of the box here; users may set osmesa instead.
    os.environ.setdefault("MUJOCO_GL", "egl")


def main(argv: list[str] | None = None) -> int:
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error of ours. Silence the final flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        import vla

        print(vla.__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"vla: unknown subcommand '{name}'; expected one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    _set_runtime_defaults()
    module = importlib.import_module(f"vla.commands.{name}")
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        print(f"\nvla {name}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        # Bad input (config, paths, data) reaches the user as one clear line, not a traceback.
        if os.environ.get("VLA_DEBUG"):
            raise
        print(f"vla {name}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # output piped into `head`: handled quietly by `main`
    except Exception:
        if os.environ.get("VLA_DEBUG"):
            raise
        import traceback

        traceback.print_exc()
        print(f"vla {name}: unexpected error (exit 3); the traceback above says where", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
