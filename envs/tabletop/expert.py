"""Scripted experts for the tabletop suite.

`TabletopExpert` executes the episode's plan (decoded from ``info["privileged"]``) one step at a
time. Each primitive is a small state machine of phases over privileged state:

    PICK          above (open) -> descend -> close -> lift (retry from "above" if the object stayed)
    PLACE_*       carry (high) -> lower -> release -> retreat
    PUSH          above (closed) -> descend behind the object -> push through -> retreat
    OPEN / CLOSE  above the gap behind the handle bar (closed) -> descend -> pull / push -> retreat

Actions are P-control toward a waypoint, in the env's action units (`ACTION_SCALE` metres per
unit, the env default). Every step also returns the subtask label of the plan step being executed,
which is what the planner learns to predict.
"""

from __future__ import annotations

import numpy as np
from vla.envs.tabletop import scene as S
from vla.envs.tabletop import tasks as T

ACTION_SCALE = 0.02      # must match TabletopEnv(action_scale=...)
HOVER_Z = 0.12           # approach height of the grip point
CARRY_Z = 0.16           # carrying height (clears a two-cube tower and the cabinet)
GRASP_MIN_Z = 0.014     # lowest grasp height of the grip point
PHASE_TIMEOUT = 40       # steps before a stuck phase gives up and moves on


class TabletopExpert:
    """Scripted expert for one tabletop task family: ``action, subtask = expert.act(obs, info)``."""

    def __init__(self, task: str) -> None:
        T.get_family(task)                        # validates the name
        self.task = task
        self.reset()

    def reset(self) -> None:
        self.k = 0                # plan step being executed
        self.phase = "start"
        self.phase_steps = 0
        self.retries = 0
        self.offset = np.zeros(3)  # grip point minus held-object centre, measured when lifted

    # ------------------------------------------------------------ helpers

    def _goto(self, hand: np.ndarray, target: np.ndarray, grip: float) -> np.ndarray:
        delta = np.clip((np.asarray(target) - hand) / ACTION_SCALE, -1.0, 1.0)
        return np.array([*delta, grip], dtype=np.float32)

    def _next_phase(self, name: str) -> None:
        self.phase = name
        self.phase_steps = 0

    def _finish_step(self) -> None:
        self.k += 1
        self.retries = 0
        self._next_phase("start")

    @staticmethod
    def _near(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
        return bool(np.linalg.norm(np.asarray(a) - np.asarray(b)) < tol)

    # ------------------------------------------------------------ main

    def act(self, obs: dict, info: dict) -> tuple[np.ndarray, str]:
        """One action f32[4] and the current subtask label."""
        if "privileged" not in info:
            raise ValueError("TabletopExpert.act: info has no 'privileged' entry; pass the env's info dict")
        p = T.decode_privileged(info["privileged"])
        plan = p["plan"]
        if not plan:
            raise ValueError("TabletopExpert.act: the privileged vector holds an empty plan")
        colors = [o["color"] for o in p["objects"]]
        shapes = tuple(o["shape"] for o in p["objects"])
        if self.k >= len(plan):                  # done: stay put with the gripper open
            return np.array([0.0, 0.0, 0.0, -1.0], dtype=np.float32), T.subtask_text(plan[-1], colors, shapes)
        step = plan[self.k]
        label = T.subtask_text(step, colors, shapes)
        self.phase_steps += 1
        if self.phase_steps > PHASE_TIMEOUT and self.phase not in ("start",):
            self._advance_on_timeout(step)
        if step.op == T.PICK:
            action = self._pick(p, step)
        elif step.op in (T.PLACE_BOWL, T.PLACE_PLATE, T.PLACE_DRAWER, T.PLACE_ON):
            action = self._place(p, step)
        elif step.op == T.PUSH:
            action = self._push(p, step)
        elif step.op in (T.OPEN, T.CLOSE):
            action = self._drawer(p, step)
        else:
            raise ValueError(f"TabletopExpert: unknown plan op {step.op}")
        return action, label

    def _advance_on_timeout(self, step: T.Step) -> None:
        order = {"above": "descend", "descend": "close" if step.op == T.PICK else "move",
                 "carry": "lower", "lower": "release", "move": "retreat", "close": "lift",
                 "release": "retreat"}
        nxt = order.get(self.phase)
        if nxt is not None:
            self._next_phase(nxt)
        elif self.phase == "retreat":
            self._finish_step()
        elif self.phase == "lift":
            self._next_phase("above")

    # ------------------------------------------------------------ primitives

    def _pick(self, p: dict, step: T.Step) -> np.ndarray:
        hand = p["hand"]
        obj = p["objects"][step.a]
        pos = obj["pos"]
        grasp_z = max(pos[2], GRASP_MIN_Z)
        if self.phase == "start":
            self._next_phase("above")
        if self.phase == "above":
            target = np.array([pos[0], pos[1], HOVER_Z])
            if np.linalg.norm(target[:2] - hand[:2]) < 0.01 and abs(target[2] - hand[2]) < 0.03:
                self._next_phase("descend")
            else:
                return self._goto(hand, target, -1.0)
        if self.phase == "descend":
            target = np.array([pos[0], pos[1], grasp_z])
            if self._near(target, hand, 0.006):
                self._next_phase("close")
            else:
                return self._goto(hand, target, -1.0)
        if self.phase == "close":
            if self.phase_steps > 4:
                self._next_phase("lift")
            else:
                return self._goto(hand, np.array([pos[0], pos[1], grasp_z]), 1.0)
        # lift
        if hand[2] > HOVER_Z - 0.01:
            lifted = pos[2] > S.object_half_height(obj["shape"]) + 0.04   # picks start on the table
            if lifted and p["gap"] > 0.01:
                self.offset = hand - pos
                self._finish_step()
                return self._goto(hand, np.array([hand[0], hand[1], CARRY_Z]), 1.0)
            self.retries += 1             # missed or dropped: open and try again (until the step limit)
            self._next_phase("above")
            return self._goto(hand, np.array([hand[0], hand[1], HOVER_Z]), -1.0)
        return self._goto(hand, np.array([hand[0], hand[1], CARRY_Z]), 1.0)

    def _place_goal(self, p: dict, step: T.Step) -> np.ndarray:
        """Where the held object's centre should be when it is let go."""
        half = S.object_half_height(p["objects"][step.a]["shape"])
        if step.op in (T.PLACE_BOWL, T.PLACE_PLATE):
            # Two objects in one container go side by side along y (the fingers open along x).
            same = [s for s in p["plan"] if s.op == step.op]
            dy = 0.0 if len(same) == 1 else (-0.028 if same.index(step) == 0 else 0.028)
            if step.op == T.PLACE_BOWL:
                return np.array([p["bowl"][0], p["bowl"][1] + dy, 0.006 + half + 0.02])
            return np.array([p["plate"][0], p["plate"][1] + dy, 2 * S.PLATE_HALF_HEIGHT + half + 0.012])
        if step.op == T.PLACE_DRAWER:
            return np.array([p["drop"][0], p["drop"][1], p["drop"][2] + half + 0.015])
        base = p["objects"][step.b]
        return np.array([base["pos"][0], base["pos"][1],
                         base["pos"][2] + S.object_half_height(base["shape"]) + half + 0.008])

    def _place(self, p: dict, step: T.Step) -> np.ndarray:
        hand = p["hand"]
        goal = self._place_goal(p, step) + self.offset     # grip-point target
        if self.phase == "start":
            self._next_phase("carry")
        held = p["objects"][step.a]["pos"]
        if self.phase in ("carry", "lower") and np.linalg.norm(hand - self.offset - held) > 0.04 and self.k > 0:
            # The object slipped out of the hand: go back to the PICK step before this one.
            self.k -= 1
            self._next_phase("start")
            return self._goto(hand, np.array([hand[0], hand[1], HOVER_Z]), -1.0)
        if self.phase == "carry":
            target = np.array([goal[0], goal[1], CARRY_Z])
            if np.linalg.norm(target[:2] - hand[:2]) < 0.008:
                self._next_phase("lower")
            else:
                return self._goto(hand, target, 1.0)
        if self.phase == "lower":
            if self._near(goal, hand, 0.006):
                self._next_phase("release")
            else:
                return self._goto(hand, goal, 1.0)
        if self.phase == "release":
            if self.phase_steps > 3:
                self._next_phase("retreat")
            else:
                return self._goto(hand, goal, -1.0)
        # retreat
        if hand[2] > HOVER_Z - 0.015:
            self._finish_step()
        return self._goto(hand, np.array([hand[0], hand[1], HOVER_Z + 0.01]), -1.0)

    def _push(self, p: dict, step: T.Step) -> np.ndarray:
        hand = p["hand"]
        obj = p["objects"][step.a]
        d = np.array(T.DIRECTION_VECTORS[T.DIRECTIONS[step.b]])
        pos = obj["pos"][:2]
        behind = pos - d * 0.055
        if self.phase == "start":
            self._next_phase("above")
        if self.phase == "above":
            target = np.array([*behind, HOVER_Z])
            if np.linalg.norm(target[:2] - hand[:2]) < 0.01:
                self._next_phase("descend")
            else:
                return self._goto(hand, target, 1.0)
        if self.phase == "descend":
            target = np.array([*behind, 0.02])
            if self._near(target, hand, 0.008):
                self._next_phase("move")
            else:
                return self._goto(hand, target, 1.0)
        if self.phase == "move":
            moved = float((pos - obj["rest_xy"]) @ d)
            if moved >= T.PUSH_DISTANCE + 0.03:
                self._next_phase("retreat")
            else:
                return self._goto(hand, np.array([*(pos - d * 0.01), 0.02]), 1.0)
        if hand[2] > HOVER_Z - 0.015:
            self._finish_step()
        return self._goto(hand, np.array([hand[0], hand[1], HOVER_Z]), 1.0)

    def _drawer(self, p: dict, step: T.Step) -> np.ndarray:
        hand = p["hand"]
        gap = p["handle"]
        q = p["drawer_q"]
        opening = step.op == T.OPEN
        if self.phase == "start":
            self._next_phase("above")
        if self.phase == "above":
            target = np.array([gap[0], gap[1], HOVER_Z])
            if np.linalg.norm(target[:2] - hand[:2]) < 0.006:
                self._next_phase("descend")
            else:
                return self._goto(hand, target, 1.0)
        if self.phase == "descend":
            target = gap.copy()
            if self._near(target, hand, 0.006):
                self._next_phase("move")
            else:
                return self._goto(hand, target, 1.0)
        if self.phase == "move":
            done = q >= T.DRAWER_OPEN_Q + 0.02 if opening else q <= 0.004
            if done:
                self._next_phase("retreat")
            else:
                dy = -0.02 if opening else 0.02
                return self._goto(hand, np.array([gap[0], gap[1] + dy, gap[2]]), 1.0)
        if hand[2] > HOVER_Z - 0.015:
            self._finish_step()
        return self._goto(hand, np.array([hand[0], hand[1], HOVER_Z]), 1.0)


def first_grasp_state(obs: dict, info: dict) -> tuple[np.ndarray, list[str]]:
    """For a freshly reset episode: the state f32[4] the hand will have where `TabletopExpert` first
    closes the gripper, and the plan's subtask labels in order (the goal frames of `vla collect
    goal_frames=N`). Defined for plans that start with a pick: the grasp point is the object's centre
    at grasp height (`_pick`'s descend target, reached to 6 mm), the fingers still open as at reset.
    Push and drawer plans close the gripper from their first step, so they have no such target."""
    p = T.decode_privileged(info["privileged"])
    plan = p["plan"]
    colors = [o["color"] for o in p["objects"]]
    shapes = tuple(o["shape"] for o in p["objects"])
    labels = [T.subtask_text(st, colors, shapes) for st in plan]
    if not plan or plan[0].op != T.PICK:
        picks = [t for t in T.list_tasks() if T.starts_with_pick(t)]
        raise ValueError(f"first_grasp_state: task {info.get('task')!r} starts with {labels[:1]}, not a pick; goal "
                         f"frames are defined for plans that start by picking an object (the families {picks})")
    pos = p["objects"][plan[0].a]["pos"]
    state = np.asarray(obs["state"], np.float32)
    goal = np.array([pos[0], pos[1], max(pos[2], GRASP_MIN_Z), state[3]], np.float32)
    return goal, labels
