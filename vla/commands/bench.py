"""`vla bench NAME [overrides]`: dispatch to ``vla.bench.<NAME>.main(argv)``; each prints JSON."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "dataloader": "samples/s through a torch DataLoader, from disk and from memory",
    "env": "env steps/s with and without rendering, collection frames/s, expert success",
    "inference": "action-chunk latency (cached vs uncached), FLOPs, fraction of matmul peak",
    "train": "training samples/s and data-wait fraction",
    "serve": "vla serve requests/s and p50/p99 latency under concurrent clients: serial vs dynamic batching",
    "eval": "closed-loop evaluation env steps/s: scripted expert and a tiny VLA, in-process and async",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vla bench NAME [key=value ...]\n\nbenchmarks:")
        for name, text in BENCHMARKS.items():
            print(f"  {name:<11} {text}")
        return 0
    name = argv[0]
    if name not in BENCHMARKS:
        print(f"vla bench: unknown benchmark '{name}'; expected one of {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"vla.bench.{name}")
    return int(module.main(argv[1:]) or 0)
