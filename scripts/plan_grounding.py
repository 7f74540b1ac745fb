"""Do the decoded plans name what the instruction names? A check over `vla eval`'s eval_info.json files.

    python scripts/plan_grounding.py EVAL_INFO.json [EVAL_INFO.json ...]

Every episode records the last plan the policy decoded (``final_plan``, a list of subtask texts). On the
tabletop pick families a step reads "pick up the <colour> <shape>" or "put it in|on the <receptacle>";
a step is *grounded* when every word it names appears in the episode's instruction (held-out wording may
say "block" where the training vocabulary says "cube": the two count as one word). Prints grounded / total
steps per file and overall, and the first steps that are not, as JSON; a step of another form counts as
not grounded.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

STEP = (re.compile(r"pick up the (.+)$"), re.compile(r"put it (?:in|on) the (.+)$"))
SYNONYMS = {"block": "cube"}


def grounded(instruction: str, step: str) -> bool:
    """Whether every word ``step`` names (its object or receptacle) appears in ``instruction``."""
    words = [SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", instruction.lower())]
    for pattern in STEP:
        m = pattern.match(step.strip().lower())
        if m:
            return all(SYNONYMS.get(w, w) in words for w in m.group(1).split())
    return False


def check(path: Path) -> dict:
    info = json.loads(path.read_text())
    if "episodes" not in info:
        raise ValueError(f"plan_grounding: {path} has no 'episodes' (expected a `vla eval` eval_info.json)")
    ok, total, misses = 0, 0, []
    for e in info["episodes"]:
        for step in e.get("final_plan") or []:
            total += 1
            if grounded(e["instruction"], step):
                ok += 1
            elif len(misses) < 5:
                misses.append({"instruction": e["instruction"], "step": step})
    return {"file": str(path), "grounded": ok, "steps": total, "misses": misses}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    rows = [check(Path(p)) for p in argv]
    ok, total = sum(r["grounded"] for r in rows), sum(r["steps"] for r in rows)
    print(json.dumps({"files": rows, "grounded": ok, "steps": total}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
