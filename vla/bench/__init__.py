"""Benchmarks behind `vla bench NAME`: each prints one JSON object on stdout."""

from __future__ import annotations

from typing import Any


def parse_bench_args(name: str, argv: list[str], defaults: dict[str, Any], *, int_lists: tuple[str, ...] = (),
                     str_lists: tuple[str, ...] = ()) -> dict[str, Any]:
    """``key=value`` overrides for `vla bench NAME`, each typed by its default.

    bool: true/false/1/0; int; list: ``[a,b]`` or ``a,b`` (ints for keys in ``int_lists``); keys in
    ``str_lists`` take a list or the word ``all``; a ``None`` default takes a string (empty = None);
    anything else stays a string. Errors name the benchmark, the key and what it expects.
    """
    args = dict(defaults)
    for a in argv:
        k, sep, v = a.partition("=")
        if not sep:
            raise ValueError(f"vla bench {name}: expected key=value, got '{a}' (keys: {sorted(defaults)})")
        if k not in defaults:
            raise ValueError(f"vla bench {name}: unknown key '{k}'; expected one of {sorted(defaults)}")
        default = defaults[k]
        try:
            if k in str_lists:
                v = v.strip("[]")
                args[k] = "all" if v == "all" else [x.strip() for x in v.split(",") if x.strip()]
            elif isinstance(default, bool):
                if v.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(v)
                args[k] = v.lower() in ("true", "1")
            elif isinstance(default, list):
                items = [x.strip() for x in v.strip("[]").split(",") if x.strip()]
                args[k] = [int(x) for x in items] if k in int_lists else items
            elif isinstance(default, int):
                args[k] = int(v)
            elif default is None:
                args[k] = v or None
            else:
                args[k] = v
        except ValueError:
            kind = "list of ints" if k in int_lists else type(default).__name__
            raise ValueError(f"vla bench {name}: {k}={v!r} is not a valid {kind}") from None
    return args
