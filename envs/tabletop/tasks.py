"""Task families of the tabletop suite: what a scene holds, how an episode's goal, layout and
instruction are sampled, and how goals and partial progress are checked.

An episode's goal is a *plan*: a short list of steps (`Step`), each one primitive with its
arguments, e.g. ``[PICK red cube, PLACE_BOWL red cube]``. The same plan gives
- the subtask labels ("pick up the red cube", "put it in the bowl"),
- partial progress: ``subtasks_done`` counts the leading steps whose predicate has held,
- success: every *persistent* step's predicate holds at once (a PICK is not persistent; an OPEN
  followed by a CLOSE is not either),
- the scripted expert's program (`vla.envs.tabletop.expert` executes steps one by one).

Layouts: ``"random"`` (the default) draws every fixture and object position per episode, so a
policy must find the named object anywhere on the table. ``"slots"`` fixes the places: each
scene has one layout (drawn once from a generator seeded by the scene's description), an
episode jitters it by at most `SLOT_JITTER` and permutes nothing but colours, the goal and the
hand's start, so *which* object the words name still changes from episode to episode while
*where* objects can be is learnt once. It separates choosing the named object from localising it.

Splits: each family has training and held-out evaluation paraphrase templates, and two
(colour, shape) combinations — the purple cube and the orange cylinder — never appear in a
training scene at all. In the eval split the (first) target object is always one of them. The
paraphrase split takes the held-out templates with training objects and colours: wording only.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from vla.envs.tabletop import scene as S

# ---------------------------------------------------------------- primitives and plans

PICK, PLACE_BOWL, PLACE_PLATE, PLACE_DRAWER, PLACE_ON, PUSH, OPEN, CLOSE = range(1, 9)
DIRECTIONS: tuple[str, ...] = ("left", "right", "back", "front")
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "back": (0.0, 1.0), "front": (0.0, -1.0)}
PUSH_DISTANCE = 0.10     # success: moved at least this far along the direction
DRAWER_OPEN_Q = 0.12     # success thresholds on the drawer joint (travel 0.15)
DRAWER_CLOSED_Q = 0.015
LIFT_HEIGHT = 0.03       # PICK holds once the object is this far above its rest height, in the hand

HELD_OUT: frozenset[tuple[str, str]] = frozenset({("purple", "cube"), ("orange", "cylinder")})
# paraphrase: held-out templates with training objects and colours; all: any template, training objects
SPLITS = ("train", "eval", "paraphrase", "all")
LAYOUTS = ("random", "slots")
SHAPE_NOUNS = {"cube": ("cube", "block"), "cylinder": ("cylinder",)}


@dataclass(frozen=True)
class Step:
    """One plan step: a primitive and its arguments (object slots, or a direction index)."""

    op: int
    a: int = -1      # object slot (PICK, PLACE_*, PUSH)
    b: int = -1      # base object slot (PLACE_ON) or direction index (PUSH)


@dataclass
class Episode:
    """Everything sampled at reset: layout, colours, goal plan and instruction."""

    task: str
    colors: list[str]                       # per object slot
    shapes: tuple[str, ...]
    object_xy: np.ndarray                   # (N, 2)
    object_yaw: np.ndarray                  # (N,)
    plan: list[Step]
    instruction: str
    hand_start: np.ndarray                  # (3,)
    bowl_xy: np.ndarray | None = None
    plate_xy: np.ndarray | None = None
    plate_color: str | None = None
    drawer_q: float = 0.0
    persistent: list[bool] = field(default_factory=list)   # per plan step: must hold at the end
    present: list[bool] = field(default_factory=list)      # per object slot: in the scene (else parked)
    in_drawer: int = -1                    # object slot that starts inside the (open) drawer, or -1
    drawer_local_xy: np.ndarray | None = None   # its position in the drawer body frame


def object_name(color: str, shape: str) -> str:
    return f"{color} {shape}"


def subtask_text(step: Step, colors: list[str], shapes: tuple[str, ...]) -> str:
    """The canonical subtask label of a plan step."""
    def obj(i: int) -> str:
        return object_name(colors[i], shapes[i])

    if step.op == PICK:
        return f"pick up the {obj(step.a)}"
    if step.op == PLACE_BOWL:
        return "put it in the bowl"
    if step.op == PLACE_PLATE:
        return "put it on the plate"
    if step.op == PLACE_DRAWER:
        return "put it in the drawer"
    if step.op == PLACE_ON:
        return f"stack it on the {obj(step.b)}"
    if step.op == PUSH:
        return f"push the {obj(step.a)} to the {DIRECTIONS[step.b]}"
    if step.op == OPEN:
        return "open the drawer"
    if step.op == CLOSE:
        return "close the drawer"
    raise ValueError(f"unknown plan op {step.op}")


# ---------------------------------------------------------------- instruction templates

# {a}, {b}, {c}: object phrases; {where}: "in the bowl" | "on the plate"; {dir}: a direction.
TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "pick-place": {
        "train": ("put the {a} {where}", "place the {a} {where}", "pick up the {a} and put it {where}",
                  "move the {a} {where}"),
        "eval": ("could you set the {a} {where}", "the {a} belongs {where}"),
    },
    "stack": {
        "train": ("stack the {a} on the {b}", "put the {a} on top of the {b}", "place the {a} onto the {b}"),
        "eval": ("set the {a} on top of the {b}", "pile the {a} onto the {b}"),
    },
    "push": {
        "train": ("push the {a} to the {dir}", "slide the {a} to the {dir}",
                  "move the {a} to the {dir} by pushing it"),
        "eval": ("shove the {a} to the {dir}", "without lifting it, move the {a} to the {dir}"),
    },
    "drawer-open": {
        "train": ("open the drawer", "pull the drawer open", "slide the drawer out"),
        "eval": ("pull out the drawer", "could you open the drawer"),
    },
    "drawer-close": {
        "train": ("close the drawer", "push the drawer shut", "slide the drawer in"),
        "eval": ("shut the drawer", "push the drawer closed"),
    },
    "drawer-put-away": {
        "train": ("put the {a} in the drawer", "put the {a} away in the drawer",
                  "store the {a} in the drawer and close it"),
        "eval": ("tidy the {a} into the drawer", "place the {a} inside the drawer and shut it"),
    },
    "pick-place-two": {
        "train": ("put the {a} and the {b} {where}", "place both the {a} and the {b} {where}",
                  "move the {a} and the {b} {where}"),
        "eval": ("the {a} and the {b} both go {where}", "collect the {a} and the {b} {where}"),
    },
    "match-color": {
        "train": ("put the object that matches the plate's colour on the plate",
                  "put the item with the same colour as the plate on the plate",
                  "find the object that matches the plate and put it on the plate"),
        "eval": ("move the object whose colour matches the plate onto the plate",
                 "place the same-coloured object on the plate"),
    },
    "drawer-retrieve": {
        "train": ("take the {a} out of the drawer, put it {where} and close the drawer",
                  "move the {a} from the drawer {where}, then shut the drawer",
                  "get the {a} from the drawer, place it {where} and close the drawer"),
        "eval": ("unpack the {a} from the drawer {where} and push the drawer shut",
                 "the {a} in the drawer should go {where}; close the drawer afterwards"),
    },
    "stack-three": {
        "train": ("stack the {b} on the {a}, then the {c} on the {b}",
                  "build a tower: the {a} at the bottom, the {b} in the middle and the {c} on top",
                  "put the {b} on the {a} and then the {c} on top of the {b}"),
        "eval": ("tower up the cubes: {a} at the bottom, then {b}, then {c}",
                 "make a stack of the {a}, the {b} and the {c}, from bottom to top"),
    },
}


def _phrase(rng: np.random.Generator, color: str, shape: str) -> str:
    nouns = SHAPE_NOUNS[shape]
    return f"{color} {nouns[int(rng.integers(len(nouns)))]}"


# ---------------------------------------------------------------- families

@dataclass(frozen=True)
class Family:
    """A task family: its scene, episode length and goal sampler."""

    name: str
    scene: S.SceneSpec
    num_subtasks: int
    max_episode_steps: int
    sample_goal: Callable[[np.random.Generator, str, tuple[str, ...]], tuple[list[Step], dict]]
    min_distractors: int = 1     # object slots the plan does not use are kept with p = DISTRACTOR_KEEP


def _pick_colors(rng: np.random.Generator, shapes: tuple[str, ...], targets: list[int], split: str) -> list[str]:
    """Distinct colours for every slot; no held-out combination in "train", and in "eval" the first
    target gets one (its shape's held-out colour)."""
    colors: list[str | None] = [None] * len(shapes)
    if split == "eval":
        t = targets[0]
        colors[t] = next(c for c, s in sorted(HELD_OUT) if s == shapes[t])
    for i in rng.permutation(len(shapes)):
        if colors[i] is not None:
            continue
        allowed = [c for c in S.COLORS if c not in colors
                   and (split == "eval" or (c, shapes[i]) not in HELD_OUT)]
        colors[i] = allowed[int(rng.integers(len(allowed)))]
    return colors  # type: ignore[return-value]


def _slots(shapes: tuple[str, ...], shape: str | None = None) -> list[int]:
    return [i for i, s in enumerate(shapes) if shape is None or s == shape]


def _goal_pick_place(rng, split, shapes):
    a = int(rng.choice(_slots(shapes)))
    in_bowl = bool(rng.integers(2))
    place = PLACE_BOWL if in_bowl else PLACE_PLATE
    return [Step(PICK, a), Step(place, a)], {"targets": [a], "where": "in the bowl" if in_bowl else "on the plate"}


def _goal_stack(rng, split, shapes):
    cubes = list(rng.permutation(_slots(shapes, "cube")))
    a, b = int(cubes[0]), int(cubes[1])
    return [Step(PICK, a), Step(PLACE_ON, a, b)], {"targets": [a, b]}


def _goal_push(rng, split, shapes):
    a = int(rng.choice(_slots(shapes)))
    d = int(rng.integers(len(DIRECTIONS)))
    return [Step(PUSH, a, d)], {"targets": [a], "dir": DIRECTIONS[d]}


def _goal_drawer_open(rng, split, shapes):
    return [Step(OPEN)], {"targets": [], "drawer_q": float(rng.uniform(0.0, 0.01))}


def _goal_drawer_close(rng, split, shapes):
    return [Step(CLOSE)], {"targets": [], "drawer_q": float(rng.uniform(0.12, S.DRAWER_TRAVEL))}


def _goal_put_away(rng, split, shapes):
    a = int(rng.choice(_slots(shapes)))
    return ([Step(OPEN), Step(PICK, a), Step(PLACE_DRAWER, a), Step(CLOSE)],
            {"targets": [a], "drawer_q": float(rng.uniform(0.0, 0.01))})


def _goal_pick_place_two(rng, split, shapes):
    order = rng.permutation(len(shapes))
    a, b = int(order[0]), int(order[1])
    in_bowl = bool(rng.integers(2))
    place = PLACE_BOWL if in_bowl else PLACE_PLATE
    return ([Step(PICK, a), Step(place, a), Step(PICK, b), Step(place, b)],
            {"targets": [a, b], "where": "in the bowl" if in_bowl else "on the plate"})


def _goal_match_color(rng, split, shapes):
    a = int(rng.choice(_slots(shapes)))
    return [Step(PICK, a), Step(PLACE_PLATE, a)], {"targets": [a], "plate_matches": a}


def _goal_drawer_retrieve(rng, split, shapes):
    a = int(rng.choice(_slots(shapes)))
    return ([Step(PICK, a), Step(PLACE_BOWL, a), Step(CLOSE)],
            {"targets": [a], "where": "in the bowl", "drawer_q": float(rng.uniform(0.13, S.DRAWER_TRAVEL)),
             "in_drawer": a})


def _goal_stack_three(rng, split, shapes):
    cubes = [int(i) for i in rng.permutation(_slots(shapes, "cube"))[:3]]
    a, b, c = cubes        # bottom, middle, top
    # In eval the held-out cube may be any of the three; put it at a random position of the tower.
    return ([Step(PICK, b), Step(PLACE_ON, b, a), Step(PICK, c), Step(PLACE_ON, c, b)],
            {"targets": [cubes[int(rng.integers(3))], *cubes], "order": cubes})


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("pick-place", S.SceneSpec(("cube", "cube", "cylinder", "cylinder"), bowl=True, plate=True), 2, 120,
           _goal_pick_place),
    Family("stack", S.SceneSpec(("cube", "cube", "cube", "cylinder")), 2, 120, _goal_stack),
    Family("push", S.SceneSpec(("cube", "cube", "cylinder")), 1, 80, _goal_push, min_distractors=0),
    Family("drawer-open", S.SceneSpec(("cube", "cylinder"), drawer=True), 1, 80, _goal_drawer_open,
           min_distractors=0),
    Family("drawer-close", S.SceneSpec(("cube", "cylinder"), drawer=True), 1, 80, _goal_drawer_close,
           min_distractors=0),
    Family("drawer-put-away", S.SceneSpec(("cube", "cube", "cylinder"), drawer=True), 4, 260, _goal_put_away),
    Family("pick-place-two", S.SceneSpec(("cube", "cube", "cylinder", "cylinder"), bowl=True, plate=True), 4, 220,
           _goal_pick_place_two),
    Family("match-color", S.SceneSpec(("cube", "cube", "cylinder"), bowl=True, plate=True), 2, 120,
           _goal_match_color),
    Family("drawer-retrieve", S.SceneSpec(("cube", "cube", "cylinder"), bowl=True, drawer=True), 3, 200,
           _goal_drawer_retrieve),
    Family("stack-three", S.SceneSpec(("cube", "cube", "cube", "cylinder")), 4, 220, _goal_stack_three,
           min_distractors=0),
]}


def get_family(task: str) -> Family:
    if task not in FAMILIES:
        raise ValueError(f"unknown tabletop task {task!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[task]


def list_tasks() -> list[str]:
    return list(FAMILIES)


def starts_with_pick(task: str) -> bool:
    """Whether every plan of this family starts by picking an object: the families that have goal frames
    (`vla collect goal_frames=N`; push and drawer plans close the gripper from their first step). A family's
    plan always has the same ops, so one sampled goal decides it."""
    fam = get_family(task)
    plan, _ = fam.sample_goal(np.random.default_rng(0), "train", fam.scene.shapes)
    return plan[0].op == PICK


# ---------------------------------------------------------------- layout

DISTRACTOR_KEEP = 0.7        # chance that an object slot the plan does not use appears as a distractor
SPAWN_X, SPAWN_Y = (-0.24, 0.24), (-0.16, 0.2)
FIXTURE_X = (-0.19, 0.19)     # bowl/plate centres: keeps their rims inside the front view
CABINET_CENTER = (0.2, 0.25)
OBJECT_CLEARANCE = 0.085     # object-object centre distance: room for the open fingers
FIXTURE_RADIUS = 0.085       # bowl/plate footprint radius incl. margin
SLOT_JITTER = 0.015          # layout="slots": each fixture and object moves at most this far (m) per axis


def _in_drawer_zone(x: float, y: float, margin: float) -> bool:
    cx, _ = CABINET_CENTER
    return abs(x - cx) < S.CAB_W / 2 + margin and y > -0.09 - margin


def _sample_point(rng, taken: list[tuple[float, float, float]], radius: float, drawer: bool,
                  extra_ok: Callable[[float, float], bool] | None = None, tries: int = 400,
                  x_range: tuple[float, float] = SPAWN_X) -> tuple[float, float]:
    for _ in range(tries):
        x, y = rng.uniform(*x_range), rng.uniform(*SPAWN_Y)
        if drawer and _in_drawer_zone(x, y, radius):
            continue
        if any(math.hypot(x - tx, y - ty) < radius + tr for tx, ty, tr in taken):
            continue
        if extra_ok is not None and not extra_ok(x, y):
            continue
        return float(x), float(y)
    raise RuntimeError("could not place an object without overlap; the layout is too crowded")


def _push_ok(start: tuple[float, float], d: tuple[float, float], others: list[tuple[float, float, float]]) -> bool:
    """The push corridor (from behind the object to past its goal) is on the table and clear."""
    sx, sy = start
    end = (sx + d[0] * 0.17, sy + d[1] * 0.17)
    back = (sx - d[0] * 0.08, sy - d[1] * 0.08)
    for px, py in (end, back):
        if not (-0.3 < px < 0.3 and -0.22 < py < 0.3):      # stays on the table and in the front view
            return False
    for ox, oy, orad in others:
        rel = (ox - sx, oy - sy)
        along = rel[0] * d[0] + rel[1] * d[1]
        across = abs(rel[0] * d[1] - rel[1] * d[0])
        if -0.1 < along < 0.22 and across < 0.05 + orad:
            return False
    return True


@dataclass(frozen=True)
class SlotLayout:
    """The fixed places of layout="slots": bowl and plate centres (or None) and one xy per object slot."""

    bowl: tuple[float, float] | None
    plate: tuple[float, float] | None
    objects: tuple[tuple[float, float], ...]


@functools.cache
def _slot_layout(task: str) -> SlotLayout:
    """The one layout of `task`'s scene, drawn from a generator seeded by the scene's description (the
    same on every machine, and shared by families of one scene, such as pick-place and
    pick-place-two), with every object slot placed and margins that leave room for the jitter."""
    spec = get_family(task).scene
    rng = np.random.default_rng(zlib.crc32(repr(spec).encode()))
    pad = 1.5 * SLOT_JITTER
    for _ in range(100):
        taken: list[tuple[float, float, float]] = []
        try:
            fixtures = {}
            for name, wanted in (("bowl", spec.bowl), ("plate", spec.plate)):
                if wanted:
                    fixtures[name] = _sample_point(rng, taken, FIXTURE_RADIUS + pad, spec.drawer, x_range=FIXTURE_X)
                    taken.append((*fixtures[name], FIXTURE_RADIUS + pad))
            objects = []
            for _slot in spec.shapes:
                objects.append(_sample_point(rng, taken, OBJECT_CLEARANCE / 2 + pad, spec.drawer))
                taken.append((*objects[-1], OBJECT_CLEARANCE / 2 + pad))
        except RuntimeError:
            continue
        return SlotLayout(fixtures.get("bowl"), fixtures.get("plate"), tuple(objects))  # floats: _sample_point
    raise RuntimeError(f"layout='slots': could not lay out the {task!r} scene without overlap")


def _slots_push_ok(plan: list[Step], lay: SlotLayout) -> bool:
    """layout="slots": the plan's push (if any) has a clear corridor among the fixed places."""
    push = next((s for s in plan if s.op == PUSH), None)
    if push is None:
        return True
    others = [(*xy, FIXTURE_RADIUS + SLOT_JITTER) for xy in (lay.bowl, lay.plate) if xy is not None]
    others += [(*xy, OBJECT_CLEARANCE / 2 + SLOT_JITTER) for i, xy in enumerate(lay.objects) if i != push.a]
    return _push_ok(lay.objects[push.a], DIRECTION_VECTORS[DIRECTIONS[push.b]], others)


def _jitter_slots(lay: SlotLayout, rng: np.random.Generator, present: list[bool],
                  in_drawer: int) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """(bowl_xy, plate_xy, object xy) of one episode: the fixed places, each moved by at most SLOT_JITTER."""
    def jitter(xy):
        return None if xy is None else np.asarray(xy) + rng.uniform(-SLOT_JITTER, SLOT_JITTER, 2)

    bowl, plate = jitter(lay.bowl), jitter(lay.plate)
    xy = np.zeros((len(lay.objects), 2))
    for i, base in enumerate(lay.objects):
        if present[i] and i != in_drawer:
            xy[i] = jitter(base)
    return bowl, plate, xy


def sample_episode(task: str, rng: np.random.Generator, split: str = "train", layout: str = "random") -> Episode:
    """Sample one episode of `task` (layout, colours, plan, instruction) from `rng`; `layout` is
    "random" (every place drawn per episode) or "slots" (the family's fixed places, jittered)."""
    if split not in SPLITS:
        raise ValueError(f"instruction_split must be one of {SPLITS}, got {split!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    fam = get_family(task)
    spec = fam.scene
    shapes = spec.shapes
    template_split = {"paraphrase": "eval"}.get(split, split)
    split = "train" if split in ("paraphrase", "all") else split  # objects and colours: the training ones
    plan, extra = fam.sample_goal(rng, split, shapes)
    if layout == "slots":      # a push needs a clear corridor, which the fixed places allow for some goals only
        fixed = _slot_layout(task)
        for _ in range(200):
            if _slots_push_ok(plan, fixed):
                break
            plan, extra = fam.sample_goal(rng, split, shapes)
        else:
            raise RuntimeError(f"layout='slots': no goal of {task!r} has a clear push corridor in its fixed layout")
    targets = extra["targets"]
    if task == "stack-three":
        targets = [extra["targets"][0]]
    # Families without a target object (drawer-open/close) differ between splits in wording only.
    colors = _pick_colors(rng, shapes, targets, split if targets else "train")
    # A random subset of the unused slots stays in the scene as distractors; the rest are parked.
    used = {st.a for st in plan if st.a >= 0} | {st.b for st in plan if st.op == PLACE_ON}
    spare = [i for i in range(len(shapes)) if i not in used]
    keep = [i for i in spare if rng.random() < DISTRACTOR_KEEP]
    if len(keep) < min(fam.min_distractors, len(spare)):
        keep = sorted(int(i) for i in rng.choice(spare, min(fam.min_distractors, len(spare)), replace=False))
    present = [i in used or i in keep for i in range(len(shapes))]

    in_drawer = int(extra.get("in_drawer", -1))
    if layout == "slots":
        bowl_xy, plate_xy, xy = _jitter_slots(fixed, rng, present, in_drawer)
    else:
        taken: list[tuple[float, float, float]] = []
        bowl_xy = plate_xy = None
        if spec.bowl:
            bowl_xy = np.array(_sample_point(rng, taken, FIXTURE_RADIUS, spec.drawer, x_range=FIXTURE_X))
            taken.append((*bowl_xy, FIXTURE_RADIUS))
        if spec.plate:
            plate_xy = np.array(_sample_point(rng, taken, FIXTURE_RADIUS, spec.drawer, x_range=FIXTURE_X))
            taken.append((*plate_xy, FIXTURE_RADIUS))
        xy = np.zeros((len(shapes), 2))
        push = next((s for s in plan if s.op == PUSH), None)
        order = [i for i in range(len(shapes)) if present[i] and i != in_drawer]
        if push is not None:                       # place the pushed object first, then keep its corridor clear
            order.remove(push.a)
            order.insert(0, push.a)
        for i in order:
            extra_ok = None
            if push is not None:
                d = DIRECTION_VECTORS[DIRECTIONS[push.b]]
                start = tuple(xy[push.a])
                if i == push.a:         # the corridor must be clear of the fixtures placed so far
                    def extra_ok(x, y, d=d):
                        return _push_ok((x, y), d, taken)
                else:                   # distractors stay out of the corridor
                    def extra_ok(x, y, d=d, start=start):
                        return _push_ok(start, d, [(x, y, OBJECT_CLEARANCE / 2)])
            xy[i] = _sample_point(rng, taken, OBJECT_CLEARANCE / 2, spec.drawer, extra_ok)
            taken.append((*xy[i], OBJECT_CLEARANCE / 2))
    yaw = np.array([rng.uniform(-0.35, 0.35) if s == "cube" else 0.0 for s in shapes])
    # The hand starts at the back, above the workspace, so it hides little of the scene from the front view.
    hand = np.array([rng.uniform(-0.08, 0.02), rng.uniform(0.12, 0.2), rng.uniform(0.12, 0.16)])

    # Instruction from a template of this split.
    templates = (TEMPLATES[task]["train"] + TEMPLATES[task]["eval"] if template_split == "all"
                 else TEMPLATES[task][template_split])
    tpl = templates[int(rng.integers(len(templates)))]
    fill = {"where": extra.get("where", ""), "dir": extra.get("dir", "")}
    names = extra.get("order", extra["targets"])
    for key, slot in zip("abc", names):
        fill[key] = _phrase(rng, colors[slot], shapes[slot])
    instruction = tpl.format(**fill)

    persistent = []
    for k, st in enumerate(plan):
        later_close = any(s.op == CLOSE for s in plan[k + 1:])
        persistent.append(st.op not in (PICK,) and not (st.op == OPEN and later_close))
    plate_color = colors[extra["plate_matches"]] if "plate_matches" in extra else None
    return Episode(task=task, colors=colors, shapes=shapes, object_xy=xy, object_yaw=yaw, plan=plan,
                   instruction=instruction, hand_start=hand, bowl_xy=bowl_xy, plate_xy=plate_xy,
                   plate_color=plate_color, drawer_q=float(extra.get("drawer_q", 0.0)), persistent=persistent,
                   present=present, in_drawer=in_drawer,
                   drawer_local_xy=np.array([rng.uniform(-0.04, 0.04), rng.uniform(-0.03, -0.01)]))


# ---------------------------------------------------------------- privileged vector layout

MAX_OBJECTS, MAX_STEPS = 5, 4
P_HAND, P_GAP, P_DRAWER_Q = slice(0, 3), 3, 4
P_HANDLE, P_DROP, P_BOWL, P_PLATE = slice(5, 8), slice(8, 11), slice(11, 14), slice(14, 17)
OBJ_BASE, OBJ_WIDTH = 17, 8          # per slot: pos(3), colour index, shape index (-1: no slot), present, rest xy
PLAN_BASE = OBJ_BASE + MAX_OBJECTS * OBJ_WIDTH
PRIVILEGED_DIM = PLAN_BASE + MAX_STEPS * 3


def decode_privileged(p: np.ndarray) -> dict:
    """Unpack the flat privileged vector (see `PRIVILEGED_DIM`) into named parts."""
    p = np.asarray(p, dtype=np.float64)
    if p.shape != (PRIVILEGED_DIM,):
        raise ValueError(f"privileged vector: expected shape ({PRIVILEGED_DIM},), got {p.shape}")
    objs = []                   # one entry per object slot of the scene (parked slots: present=False)
    for i in range(MAX_OBJECTS):
        o = p[OBJ_BASE + i * OBJ_WIDTH: OBJ_BASE + (i + 1) * OBJ_WIDTH]
        if o[4] >= 0:
            objs.append({"pos": o[0:3], "color": S.COLORS[int(o[3])], "shape": S.SHAPES[int(o[4])],
                         "present": bool(o[5] > 0.5), "rest_xy": o[6:8]})
    plan = []
    for k in range(MAX_STEPS):
        op, a, b = (int(round(v)) for v in p[PLAN_BASE + 3 * k: PLAN_BASE + 3 * k + 3])
        if op > 0:
            plan.append(Step(op, a, b))
    return {"hand": p[P_HAND], "gap": p[P_GAP], "drawer_q": p[P_DRAWER_Q], "handle": p[P_HANDLE],
            "drop": p[P_DROP], "bowl": p[P_BOWL], "plate": p[P_PLATE], "objects": objs, "plan": plan}
