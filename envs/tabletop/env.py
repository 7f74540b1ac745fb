"""`TabletopEnv`: the Gymnasium env of the tabletop suite (one task family per instance).

Observation (docs/contracts.md "Environments"):
    {"images": {cam: uint8[H, W, 3]}, "state": float32[4]}   state = grip point xyz + finger gap (m)
Action: float32[4] in [-1, 1]: dx, dy, dz (scaled to `action_scale` metres per step) and gripper
(> 0 closes, < 0 opens; the finger servo target is linear in it) — the MetaWorld layout.
Control runs at 1 / (timestep * n_substeps) = 20 Hz by default.

info: "instruction", "task", "success", "subtasks_done", "num_subtasks", "subtask" (the label
of the first unfinished plan step), and "privileged" (float32[PRIVILEGED_DIM], layout in
`tasks.decode_privileged`; for scripted experts only, never for the learned policy).

`reset(seed=..., options={"instruction": str})`: the option replaces the instruction text (e.g. a
user's own paraphrase); the goal itself always comes from the seed.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
from vla.envs.rendering import image_hw as _image_hw
from vla.envs.tabletop import scene as S
from vla.envs.tabletop import tasks as T

DEFAULT_CAMERAS: tuple[str, ...] = ("front", "wrist")
CAMERAS: tuple[str, ...] = ("front", "wrist")
STATE_NAMES: tuple[str, ...] = ("grip_x", "grip_y", "grip_z", "gripper_opening")
ACTION_NAMES: tuple[str, ...] = ("dx", "dy", "dz", "gripper")
WORKSPACE_LOW = np.array([-0.4, -0.28, 0.012])    # grip point limits; z keeps the fingertips off the table
WORKSPACE_HIGH = np.array([0.4, 0.38, 0.3])


class TabletopEnv(gym.Env):
    """One tabletop task family; see the module docstring for spaces and info."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, task: str, *, seed: int | None = None, cameras: tuple[str, ...] | list[str] = DEFAULT_CAMERAS,
                 image_size: int | tuple[int, int] = 96, instruction_split: str = "train",
                 max_episode_steps: int | None = None, terminate_on_success: bool = False,
                 render_mode: str | None = None, n_substeps: int = 25, action_scale: float = 0.02,
                 layout: str = "random") -> None:
        import mujoco

        self.family = T.get_family(task)
        self.task = task
        if instruction_split not in T.SPLITS:
            raise ValueError(f"instruction_split must be one of {T.SPLITS}, got {instruction_split!r}")
        self.instruction_split = instruction_split
        if layout not in T.LAYOUTS:
            raise ValueError(f"layout must be one of {T.LAYOUTS}, got {layout!r}")
        self.layout = layout
        cams = tuple(cameras)
        bad = [c for c in cams if c not in CAMERAS]
        if bad:
            raise ValueError(f"tabletop cameras: unknown {bad}; expected names from {CAMERAS}")
        self.cameras = cams
        self.image_hw = _image_hw(image_size)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode: expected None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.max_episode_steps = int(max_episode_steps or self.family.max_episode_steps)
        self.terminate_on_success = terminate_on_success
        self.n_substeps = int(n_substeps)
        self.action_scale = float(action_scale)

        self.model = mujoco.MjModel.from_xml_string(S.build_scene(self.family.scene, T.CABINET_CENTER))
        self.data = mujoco.MjData(self.model)
        self._ids()
        self._obs_renderer = None      # one renderer for all observation cameras
        self._renderers: dict = {}     # (camera, (H, W)) -> CameraRenderer, made on first use
        # False: step() returns {"state"} without "images" (nothing rendered; reset always renders). The
        # rollout engine clears it for steps whose images nobody reads (mid-chunk, no video, no store).
        self.observe_images = True
        self.action_names, self.state_names = ACTION_NAMES, STATE_NAMES

        h, w = self.image_hw
        self.observation_space = gym.spaces.Dict({
            "images": gym.spaces.Dict({c: gym.spaces.Box(0, 255, (h, w, 3), np.uint8) for c in self.cameras}),
            # Generous bounds: the grip point stays near the workspace box, the gap within [0, 7 cm].
            "state": gym.spaces.Box(np.array([-1, -1, -1, -0.01], np.float32), np.array([1, 1, 1, 0.1], np.float32),
                                    dtype=np.float32),
        })
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.episode: T.Episode | None = None
        self.instruction = ""
        self._steps = 0
        self._done = 0
        self._rest = np.zeros((len(self.family.scene.shapes), 3))
        if seed is not None:
            self.np_random, _ = gym.utils.seeding.np_random(seed)

    # ------------------------------------------------------------ model lookups

    def _ids(self) -> None:
        m = self.model
        spec = self.family.scene
        self._obj_body = [m.body(f"obj{i}").id for i in range(len(spec.shapes))]
        self._obj_geom = [m.geom(f"obj{i}").id for i in range(len(spec.shapes))]
        self._obj_qadr = [m.jnt_qposadr[m.joint(f"obj{i}").id] for i in range(len(spec.shapes))]
        self._obj_vadr = [m.jnt_dofadr[m.joint(f"obj{i}").id] for i in range(len(spec.shapes))]
        self._hand_q = m.jnt_qposadr[m.joint("hand").id]
        self._finger_q = [m.jnt_qposadr[m.joint(n).id] for n in ("finger_left", "finger_right")]
        self._finger_geoms = {m.geom("finger_left").id, m.geom("finger_right").id}
        self._grip = m.site("grip").id
        self._drawer_q = m.jnt_qposadr[m.joint("drawer").id] if spec.drawer else None
        self._drawer_body = m.body("drawer").id if spec.drawer else None
        self._bowl = m.body("bowl").id if spec.bowl else None
        self._plate = m.body("plate").id if spec.plate else None
        self._plate_geom = m.geom("plate").id if spec.plate else None

    # ------------------------------------------------------------ gym API

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        import mujoco

        super().reset(seed=seed)
        ep = T.sample_episode(self.task, self.np_random, self.instruction_split, self.layout)
        if options and options.get("instruction") is not None:
            text = options["instruction"]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"reset options['instruction']: expected a non-empty str, got {text!r}")
            ep.instruction = text
        self.episode = ep
        self.instruction = ep.instruction
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        if self._bowl is not None:
            m.body_pos[self._bowl][:2] = ep.bowl_xy
        if self._plate is not None:
            m.body_pos[self._plate][:2] = ep.plate_xy
            rgb = S.COLOR_RGBA[ep.plate_color] if ep.plate_color else S.NEUTRAL_PLATE_RGBA
            m.geom_rgba[self._plate_geom][:3] = rgb
        for i, shape in enumerate(ep.shapes):
            g, b, q = self._obj_geom[i], self._obj_body[i], self._obj_qadr[i]
            on = ep.present[i]
            # A parked slot floats (gravity compensated), invisible and without contacts, off the table.
            m.geom_rgba[g] = (*S.COLOR_RGBA[ep.colors[i]], 1.0 if on else 0.0)
            m.geom_contype[g] = m.geom_conaffinity[g] = 1 if on else 0
            m.body_gravcomp[b] = 0.0 if on else 1.0
            xy = ep.object_xy[i] if on else (-1.0 + 0.2 * i, 2.0)
            z = S.object_half_height(shape) + 0.001
            if i == ep.in_drawer:     # on the floor of the open drawer (the drawer body is at the cabinet centre)
                cx, cy = T.CABINET_CENTER
                xy = (cx + ep.drawer_local_xy[0], cy - ep.drawer_q + ep.drawer_local_xy[1])
                z += S.DRAWER_BASE_Z + 0.008
            d.qpos[q:q + 3] = (*xy, z)
            d.qpos[q + 3:q + 7] = (math.cos(ep.object_yaw[i] / 2), 0.0, 0.0, math.sin(ep.object_yaw[i] / 2))
        d.qpos[self._hand_q:self._hand_q + 3] = ep.hand_start
        d.qpos[self._hand_q + 3:self._hand_q + 7] = (1.0, 0.0, 0.0, 0.0)
        d.mocap_pos[0] = ep.hand_start
        if self._drawer_q is not None:
            d.qpos[self._drawer_q] = ep.drawer_q
        d.ctrl[:] = 0.0
        mujoco.mj_forward(m, d)
        for _ in range(40):                      # let objects settle onto the table
            mujoco.mj_step(m, d)
        self._rest = np.array([d.xpos[b].copy() for b in self._obj_body])
        self._steps = 0
        self._done = 0
        self._update_progress()
        return self._obs(), self._info()

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        import mujoco

        if self.episode is None:
            raise RuntimeError("TabletopEnv.step called before reset()")
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (4,):
            raise ValueError(f"tabletop action: expected shape (4,) [dx, dy, dz, gripper], got {a.shape} "
                             f"at step {self._steps}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"tabletop action: non-finite values {a.tolist()} at step {self._steps}")
        a = np.clip(a, -1.0, 1.0)
        d = self.data
        grip = d.site_xpos[self._grip]
        d.mocap_pos[0] = np.clip(grip + a[:3] * self.action_scale, WORKSPACE_LOW, WORKSPACE_HIGH)
        d.ctrl[:] = (a[3] + 1.0) / 2.0 * S.FINGER_TRAVEL
        for _ in range(self.n_substeps):
            mujoco.mj_step(self.model, d)
        self._steps += 1
        success = self._update_progress()
        terminated = bool(success and self.terminate_on_success)
        truncated = self._steps >= self.max_episode_steps
        return self._obs(self.observe_images), float(success), terminated, truncated, self._info(success)

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        cam = self.cameras[0] if self.cameras else "front"
        return self.render_camera(cam)

    def close(self) -> None:
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()
        if self._obs_renderer is not None:
            self._obs_renderer.close()
            self._obs_renderer = None

    # ------------------------------------------------------------ observation and info

    def render_camera(self, camera: str, image_size: int | tuple[int, int] | None = None) -> np.ndarray:
        """Render one camera, uint8[H, W, 3] (upright), at the env's image size unless given."""
        hw = self.image_hw if image_size is None else _image_hw(image_size)
        key = (camera, hw)
        if key not in self._renderers:
            from vla.envs.rendering import CameraRenderer

            self._renderers[key] = CameraRenderer(self.model, [camera], hw, rotate_cameras=())
        return self._renderers[key].render(self.data)[camera]

    def gripper_state(self) -> np.ndarray:
        d = self.data
        gap = S.MAX_OPENING - d.qpos[self._finger_q[0]] - d.qpos[self._finger_q[1]]
        return np.array([*d.site_xpos[self._grip], gap], dtype=np.float32)

    def _obs(self, images: bool = True) -> dict:
        if not images:
            return {"state": self.gripper_state()}
        if self.cameras and self._obs_renderer is None:
            from vla.envs.rendering import CameraRenderer

            self._obs_renderer = CameraRenderer(self.model, self.cameras, self.image_hw, rotate_cameras=())
        images = self._obs_renderer.render(self.data) if self.cameras else {}
        return {"images": images, "state": self.gripper_state()}

    def drawer_q(self) -> float:
        return float(self.data.qpos[self._drawer_q]) if self._drawer_q is not None else 0.0

    def _info(self, success: bool | None = None) -> dict:
        ep = self.episode
        if success is None:
            success = self._success()
        label = T.subtask_text(ep.plan[min(self._done, len(ep.plan) - 1)], ep.colors, ep.shapes)
        return {"instruction": self.instruction, "task": self.task, "success": bool(success),
                "subtasks_done": int(self._done), "num_subtasks": len(ep.plan), "subtask": label,
                "privileged": self.privileged()}

    def privileged(self) -> np.ndarray:
        """The flat privileged state vector (layout: `tasks.decode_privileged`)."""
        d, ep = self.data, self.episode
        p = np.zeros(T.PRIVILEGED_DIM, dtype=np.float32)
        p[0:4] = self.gripper_state()
        if self._drawer_body is not None:
            p[T.P_DRAWER_Q] = self.drawer_q()
            p[T.P_HANDLE] = d.site_xpos[self.model.site("handle_gap").id]
            p[T.P_DROP] = d.site_xpos[self.model.site("drawer_drop").id]
        if self._bowl is not None:
            p[T.P_BOWL] = d.xpos[self._bowl]
        if self._plate is not None:
            p[T.P_PLATE] = d.xpos[self._plate]
        for i in range(T.MAX_OBJECTS):
            p[T.OBJ_BASE + i * T.OBJ_WIDTH + 4] = -1.0      # no such slot
        for i, shape in enumerate(ep.shapes):
            base = T.OBJ_BASE + i * T.OBJ_WIDTH
            p[base:base + 3] = d.xpos[self._obj_body[i]]
            p[base + 3] = S.COLORS.index(ep.colors[i])
            p[base + 4] = S.SHAPES.index(shape)
            p[base + 5] = float(ep.present[i])
            p[base + 6:base + 8] = self._rest[i, :2]
        for k, st in enumerate(ep.plan):
            p[T.PLAN_BASE + 3 * k: T.PLAN_BASE + 3 * k + 3] = (st.op, st.a, st.b)
        return p

    # ------------------------------------------------------------ goal predicates

    def _touching_hand(self, i: int) -> bool:
        g = self._obj_geom[i]
        d = self.data
        for c in d.contact[:d.ncon]:
            if (c.geom1 == g and c.geom2 in self._finger_geoms) or (c.geom2 == g and c.geom1 in self._finger_geoms):
                return True
        return False

    def _obj_pos(self, i: int) -> np.ndarray:
        return self.data.xpos[self._obj_body[i]]

    def in_bowl(self, i: int) -> bool:
        p, c = self._obj_pos(i), self.data.xpos[self._bowl]
        half = S.object_half_height(self.episode.shapes[i])
        return bool(math.hypot(*(p[:2] - c[:2])) < S.BOWL_RADIUS - 0.012 and p[2] < 0.006 + half + 0.015)

    def on_plate(self, i: int) -> bool:
        p, c = self._obj_pos(i), self.data.xpos[self._plate]
        half = S.object_half_height(self.episode.shapes[i])
        top = 2 * S.PLATE_HALF_HEIGHT
        return bool(math.hypot(*(p[:2] - c[:2])) < S.PLATE_RADIUS - 0.005 and top + half - 0.01 < p[2] < top + half
                    + 0.012)

    def in_drawer(self, i: int) -> bool:
        local = self._obj_pos(i) - self.data.xpos[self._drawer_body]
        x0, x1, y0, y1 = S.drawer_inner_bounds()
        return bool(x0 < local[0] < x1 and y0 < local[1] < y1 and local[2] < S.DRAWER_WALL_TOP + 0.01)

    def on_top(self, i: int, j: int) -> bool:
        p, q = self._obj_pos(i), self._obj_pos(j)
        dz = p[2] - q[2]
        want = S.object_half_height(self.episode.shapes[i]) + S.object_half_height(self.episode.shapes[j])
        return bool(math.hypot(*(p[:2] - q[:2])) < 0.025 and want - 0.008 < dz < want + 0.012)

    def step_holds(self, st: T.Step) -> bool:
        """Whether plan step `st`'s goal predicate holds in the current state."""
        if st.op == T.PICK:
            return bool(self._obj_pos(st.a)[2] > self._rest[st.a, 2] + T.LIFT_HEIGHT and self._touching_hand(st.a))
        if st.op == T.PLACE_BOWL:
            return self.in_bowl(st.a) and not self._touching_hand(st.a)
        if st.op == T.PLACE_PLATE:
            return self.on_plate(st.a) and not self._touching_hand(st.a)
        if st.op == T.PLACE_DRAWER:
            return self.in_drawer(st.a) and not self._touching_hand(st.a)
        if st.op == T.PLACE_ON:
            return self.on_top(st.a, st.b) and not self._touching_hand(st.a)
        if st.op == T.PUSH:
            dx, dy = T.DIRECTION_VECTORS[T.DIRECTIONS[st.b]]
            moved = self._obj_pos(st.a)[:2] - self._rest[st.a, :2]
            return bool(moved[0] * dx + moved[1] * dy >= T.PUSH_DISTANCE)
        if st.op == T.OPEN:
            return self.drawer_q() >= T.DRAWER_OPEN_Q
        if st.op == T.CLOSE:
            return self.drawer_q() <= T.DRAWER_CLOSED_Q
        raise ValueError(f"unknown plan op {st.op}")

    def _success(self) -> bool:
        ep = self.episode
        return all(self.step_holds(st) for st, keep in zip(ep.plan, ep.persistent) if keep)

    def _update_progress(self) -> bool:
        """Latch partial progress in plan order: the next unfinished step counts as done once its
        predicate holds (later steps are not looked at, so a drawer that starts closed does not tick
        off a final "close the drawer"); success completes the plan. Returns success."""
        ep = self.episode
        if self._success():
            self._done = len(ep.plan)
            return True
        while self._done < len(ep.plan) - 1 and self.step_holds(ep.plan[self._done]):
            self._done += 1
        return False
