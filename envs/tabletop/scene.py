"""MJCF for the tabletop suite, assembled from small parts.

Every part is a function that returns an XML fragment; `build_scene` glues the parts a task
family needs into one model string. Nothing here touches MuJoCo itself, so the geometry can be
read (and tested) without compiling.

World frame: the table top is the plane z = 0; +x points to the right and +y away from the
"front" camera; z is up.

The gripper is a free-floating two-finger hand ("hand") pulled by a mocap body ("hand_target")
through a soft weld constraint (the Sawyer-in-MetaWorld recipe without the arm). The env moves
the mocap target; the weld drags the hand after it, so contacts with the table, the drawer or a
held block push back with bounded force instead of the infinite force a kinematic mocap hand
would apply. Hand and fingers have gravity compensation. Each finger slides along x on its own
position actuator with a force limit, which sets the grasp force.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# ---------------------------------------------------------------- geometry constants (metres)

CUBE_HALF = 0.02                 # cubes are 4 cm
CYL_RADIUS, CYL_HALF = 0.019, 0.024  # cylinders are 3.8 cm wide, 4.8 cm tall
OBJECT_MASS = 0.05

FINGER_HALF = (0.005, 0.011, 0.03)   # x (closing direction), y, z
FINGER_X0 = 0.04                 # finger centre offset from the grip point when fully open
FINGER_Z = 0.02                  # finger centre height above the grip point
FINGER_TRAVEL = 0.035            # each finger slides this far when closing
PALM_Z = FINGER_Z + FINGER_HALF[2] + 0.01  # palm centre above the grip point
MAX_OPENING = 2 * (FINGER_X0 - FINGER_HALF[0])  # gap between finger pads when open: 7 cm

BOWL_RADIUS, BOWL_WALL_HEIGHT, BOWL_SEGMENTS = 0.07, 0.035, 12
PLATE_RADIUS, PLATE_HALF_HEIGHT = 0.075, 0.004

# Cabinet with one drawer, facing -y (the drawer slides out toward the front camera).
CAB_W, CAB_D, CAB_H, CAB_T = 0.22, 0.18, 0.11, 0.01
DRAWER_TRAVEL = 0.15             # slide range [0, DRAWER_TRAVEL]
DRAWER_BASE_Z = CAB_T + 0.004    # drawer floor bottom (sits above the cabinet floor)
DRAWER_WALL_TOP = 0.085          # top of the drawer walls
HANDLE_OUT = 0.045               # handle bar distance in front of the drawer front
HANDLE_Z = 0.05                  # handle bar height
HANDLE_HALF_LEN, HANDLE_RADIUS = 0.055, 0.006

TABLE_HALF = (0.45, 0.36)        # table top half extents (x, y)
TABLE_CENTER_Y = 0.06

COLOR_RGBA: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.13, 0.13),
    "green": (0.13, 0.70, 0.20),
    "blue": (0.13, 0.30, 0.92),
    "yellow": (0.96, 0.84, 0.08),
    "purple": (0.58, 0.20, 0.78),
    "orange": (1.00, 0.50, 0.05),
    "cyan": (0.08, 0.82, 0.86),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGBA)
SHAPES: tuple[str, ...] = ("cube", "cylinder")
NEUTRAL_PLATE_RGBA = (0.92, 0.92, 0.88)


@dataclass(frozen=True)
class SceneSpec:
    """What one task family's model contains: fixtures and the shape of each object slot."""

    shapes: tuple[str, ...]        # one entry per movable object, "cube" | "cylinder"
    bowl: bool = False
    plate: bool = False
    drawer: bool = False


def _f(*xs: float) -> str:
    return " ".join(f"{x:.5g}" for x in xs)


def object_half_height(shape: str) -> float:
    """Rest height of an object's centre above the surface it stands on."""
    if shape == "cube":
        return CUBE_HALF
    if shape == "cylinder":
        return CYL_HALF
    raise ValueError(f"unknown object shape {shape!r}; expected one of {SHAPES}")


# ---------------------------------------------------------------- parts

def header_xml() -> str:
    """Options, rendering quality, materials and defaults shared by every scene."""
    return """
  <compiler angle="radian" autolimits="true"/>
  <option timestep="0.002" integrator="implicitfast" cone="elliptic" impratio="10"/>
  <visual>
    <global offwidth="640" offheight="480"/>
    <quality shadowsize="0" offsamples="0"/>
    <headlight ambient="0.45 0.45 0.45" diffuse="0.55 0.55 0.55" specular="0.05 0.05 0.05"/>
    <map znear="0.01"/>
  </visual>
  <asset>
    <texture name="grid" type="2d" builtin="checker" rgb1="0.62 0.55 0.45" rgb2="0.58 0.51 0.41"
             width="64" height="64"/>
    <material name="table" texture="grid" texrepeat="6 6" reflectance="0"/>
    <material name="wood" rgba="0.55 0.38 0.22 1" reflectance="0"/>
    <material name="drawer" rgba="0.78 0.66 0.48 1" reflectance="0"/>
    <material name="metal" rgba="0.25 0.25 0.28 1" reflectance="0"/>
    <material name="bowl" rgba="0.9 0.9 0.92 1" reflectance="0"/>
  </asset>
  <default>
    <geom friction="1.0 0.01 0.0005" solref="0.004 1" solimp="0.95 0.99 0.001" condim="4"/>
  </default>"""


def table_xml() -> str:
    """A floor and a table whose top surface is the plane z = 0."""
    hx, hy = TABLE_HALF
    return f"""
    <light pos="0 -0.3 1.5" dir="0 0.2 -1" diffuse="0.5 0.5 0.5" castshadow="false"/>
    <geom name="floor" type="plane" size="3 3 0.1" pos="0 0 -0.75" rgba="0.35 0.37 0.4 1" contype="0"
          conaffinity="0"/>
    <geom name="table" type="box" size="{_f(hx, hy, 0.025)}" pos="{_f(0, TABLE_CENTER_Y, -0.025)}"
          material="table"/>"""


def cameras_xml() -> str:
    """The fixed "front" overview camera (angled down at the workspace)."""
    # Looks from (0, -0.32, 0.55) at roughly (0, 0.05, 0); x axis along world x keeps images upright.
    look = (0.0, 0.05 + 0.32, -0.55)
    n = math.hypot(look[1], look[2])
    up = (0.0, -look[2] / n, look[1] / n)
    return f"""
    <camera name="front" pos="0 -0.32 0.55" xyaxes="1 0 0 {_f(*up)}" fovy="58"/>"""


def gripper_xml(start: tuple[float, float, float] = (0.0, -0.12, 0.18)) -> str:
    """Mocap target + free hand with two sliding fingers and a wrist camera."""
    fx, fy, fz = FINGER_HALF
    finger_geom = (f'type="box" size="{_f(fx, fy, fz)}" friction="1.6 0.02 0.001" condim="4" '
                   'rgba="0.2 0.2 0.22 1"')
    finger_joint = f'type="slide" range="0 {FINGER_TRAVEL}" damping="2" armature="0.01"'
    return f"""
    <body name="hand_target" mocap="true" pos="{_f(*start)}"/>
    <body name="hand" pos="{_f(*start)}" gravcomp="1">
      <freejoint name="hand"/>
      <inertial pos="0 0 {PALM_Z}" mass="1.0" diaginertia="0.01 0.01 0.01"/>
      <geom name="palm" type="box" size="0.05 0.014 0.01" pos="0 0 {PALM_Z}" rgba="0.3 0.3 0.34 1"/>
      <geom name="wrist_link" type="cylinder" size="0.016 0.05" pos="0 0 {PALM_Z + 0.06}"
            rgba="0.55 0.55 0.6 1" contype="0" conaffinity="0"/>
      <site name="grip" pos="0 0 0" size="0.004" rgba="1 0 0 0"/>
      <camera name="wrist" pos="0 -0.065 {PALM_Z + 0.02}" xyaxes="1 0 0 0 0.906 0.423" fovy="75"/>
      <body name="finger_left" pos="{-FINGER_X0} 0 {FINGER_Z}" gravcomp="1">
        <joint name="finger_left" axis="1 0 0" {finger_joint}/>
        <geom name="finger_left" {finger_geom}/>
      </body>
      <body name="finger_right" pos="{FINGER_X0} 0 {FINGER_Z}" gravcomp="1">
        <joint name="finger_right" axis="-1 0 0" {finger_joint}/>
        <geom name="finger_right" {finger_geom}/>
      </body>
    </body>"""


def object_xml(index: int, shape: str) -> str:
    """A movable object slot `obj{index}`; colour and pose are set at reset."""
    if shape == "cube":
        geom = f'type="box" size="{_f(CUBE_HALF, CUBE_HALF, CUBE_HALF)}"'
    elif shape == "cylinder":
        geom = f'type="cylinder" size="{_f(CYL_RADIUS, CYL_HALF)}"'
    else:
        raise ValueError(f"object slot {index}: unknown shape {shape!r}; expected one of {SHAPES}")
    x = -0.3 + 0.1 * index
    return f"""
    <body name="obj{index}" pos="{_f(x, -0.1, object_half_height(shape))}">
      <freejoint name="obj{index}"/>
      <geom name="obj{index}" {geom} mass="{OBJECT_MASS}" friction="1.2 0.02 0.001" rgba="1 1 1 1"/>
    </body>"""


def bowl_xml() -> str:
    """A round bowl approximated by a flat base and a ring of wall segments (MuJoCo has no concave
    collision primitives)."""
    seg_half = BOWL_RADIUS * math.tan(math.pi / BOWL_SEGMENTS) + 0.002
    walls = []
    for k in range(BOWL_SEGMENTS):
        a = 2 * math.pi * k / BOWL_SEGMENTS
        walls.append(
            f'      <geom name="bowl_wall{k}" type="box" size="{_f(0.004, seg_half, BOWL_WALL_HEIGHT / 2)}" '
            f'pos="{_f(BOWL_RADIUS * math.cos(a), BOWL_RADIUS * math.sin(a), BOWL_WALL_HEIGHT / 2)}" '
            f'euler="0 0 {a:.5f}" material="bowl"/>')
    return f"""
    <body name="bowl" pos="-0.15 0.1 0">
      <geom name="bowl_base" type="cylinder" size="{_f(BOWL_RADIUS + 0.004, 0.003)}" pos="0 0 0.003"
            material="bowl"/>
{chr(10).join(walls)}
    </body>"""


def plate_xml() -> str:
    """A flat round plate; its colour is set at reset (neutral unless a task colours it)."""
    return f"""
    <body name="plate" pos="0.15 0.1 0">
      <geom name="plate" type="cylinder" size="{_f(PLATE_RADIUS, PLATE_HALF_HEIGHT)}"
            pos="0 0 {PLATE_HALF_HEIGHT}" rgba="{_f(*NEUTRAL_PLATE_RGBA)} 1"/>
    </body>"""


def drawer_inner_bounds() -> tuple[float, float, float, float]:
    """(x_min, x_max, y_min, y_max) of the drawer's interior in the drawer body frame."""
    half_w = CAB_W / 2 - CAB_T - 0.004   # drawer outer half width (a little play inside the cabinet)
    front_y = -CAB_D / 2 + CAB_T / 2
    back_y = CAB_D / 2 - 2 * CAB_T
    return (-half_w + CAB_T, half_w - CAB_T, front_y + CAB_T / 2, back_y - CAB_T / 2)


def cabinet_xml(center: tuple[float, float] = (0.2, 0.25)) -> str:
    """A cabinet with one drawer on a slide joint and a bar handle on its front.

    The drawer body's origin is the cabinet centre on the table; the joint coordinate is how far
    the drawer is pulled out (toward -y)."""
    cx, cy = center
    w, d, h, t = CAB_W / 2, CAB_D / 2, CAB_H, CAB_T
    dw = w - t - 0.004                    # drawer half width
    front_y = -d + t / 2                  # drawer front panel centre (flush with the cabinet front)
    back_y = d - 2 * t
    wall_h = (DRAWER_WALL_TOP - DRAWER_BASE_Z) / 2
    wall_z = DRAWER_BASE_Z + wall_h
    depth_half = (back_y - front_y) / 2
    mid_y = (back_y + front_y) / 2
    bar_y = front_y - t / 2 - HANDLE_OUT
    post_len = HANDLE_OUT / 2
    return f"""
    <body name="cabinet" pos="{_f(cx, cy, 0)}">
      <geom name="cab_bottom" type="box" size="{_f(w, d, t / 2)}" pos="{_f(0, 0, t / 2)}" material="wood"/>
      <geom name="cab_top" type="box" size="{_f(w, d, t / 2)}" pos="{_f(0, 0, h - t / 2)}" material="wood"/>
      <geom name="cab_left" type="box" size="{_f(t / 2, d, h / 2)}" pos="{_f(-w + t / 2, 0, h / 2)}"
            material="wood"/>
      <geom name="cab_right" type="box" size="{_f(t / 2, d, h / 2)}" pos="{_f(w - t / 2, 0, h / 2)}"
            material="wood"/>
      <geom name="cab_back" type="box" size="{_f(w, t / 2, h / 2)}" pos="{_f(0, d - t / 2, h / 2)}"
            material="wood"/>
    </body>
    <body name="drawer" pos="{_f(cx, cy, 0)}">
      <joint name="drawer" type="slide" axis="0 -1 0" range="0 {DRAWER_TRAVEL}" damping="3"
             frictionloss="0.05" armature="0.05"/>
      <geom name="drawer_base" type="box" size="{_f(dw, depth_half + t / 2, 0.004)}"
            pos="{_f(0, mid_y, DRAWER_BASE_Z + 0.004)}" material="drawer"/>
      <geom name="drawer_front" type="box" size="{_f(w - t, t / 2, wall_h)}" pos="{_f(0, front_y, wall_z)}"
            material="drawer"/>
      <geom name="drawer_back" type="box" size="{_f(dw, t / 2, wall_h)}" pos="{_f(0, back_y, wall_z)}"
            material="drawer"/>
      <geom name="drawer_left" type="box" size="{_f(t / 2, depth_half, wall_h)}"
            pos="{_f(-dw + t / 2, mid_y, wall_z)}" material="drawer"/>
      <geom name="drawer_right" type="box" size="{_f(t / 2, depth_half, wall_h)}"
            pos="{_f(dw - t / 2, mid_y, wall_z)}" material="drawer"/>
      <geom name="handle_post_l" type="box" size="{_f(0.005, post_len, 0.005)}"
            pos="{_f(-HANDLE_HALF_LEN + 0.005, front_y - t / 2 - post_len, HANDLE_Z)}" material="metal"/>
      <geom name="handle_post_r" type="box" size="{_f(0.005, post_len, 0.005)}"
            pos="{_f(HANDLE_HALF_LEN - 0.005, front_y - t / 2 - post_len, HANDLE_Z)}" material="metal"/>
      <geom name="handle" type="capsule" fromto="{_f(-HANDLE_HALF_LEN, bar_y, HANDLE_Z, HANDLE_HALF_LEN, bar_y,
                                                       HANDLE_Z)}"
            size="{HANDLE_RADIUS}" material="metal"/>
      <site name="handle_gap" pos="{_f(0, (bar_y + front_y - t / 2) / 2, HANDLE_Z)}" size="0.004" rgba="0 1 0 0"/>
      <site name="drawer_drop" pos="{_f(0, front_y + t / 2 + 0.06, DRAWER_BASE_Z + 0.008)}" size="0.004"
            rgba="0 0 1 0"/>
    </body>"""


def actuators_xml() -> str:
    """Finger position servos: the force limit is the grasp force."""
    servo = f'kp="300" ctrlrange="0 {FINGER_TRAVEL}" forcerange="-12 12"'
    return f"""
  <actuator>
    <position name="finger_left" joint="finger_left" {servo}/>
    <position name="finger_right" joint="finger_right" {servo}/>
  </actuator>
  <equality>
    <weld name="hand_weld" body1="hand_target" body2="hand" solref="0.02 1" solimp="0.95 0.99 0.001"/>
  </equality>"""


def build_scene(spec: SceneSpec, cabinet_center: tuple[float, float] = (0.2, 0.25)) -> str:
    """The full MJCF string for one task family's scene."""
    parts = [table_xml(), cameras_xml(), gripper_xml()]
    if spec.bowl:
        parts.append(bowl_xml())
    if spec.plate:
        parts.append(plate_xml())
    if spec.drawer:
        parts.append(cabinet_xml(cabinet_center))
    parts += [object_xml(i, s) for i, s in enumerate(spec.shapes)]
    excludes = ['    <exclude body1="finger_left" body2="finger_right"/>']
    if spec.drawer:
        excludes.append('    <exclude body1="cabinet" body2="drawer"/>')
    return f"""<mujoco model="vla_tabletop">{header_xml()}
  <worldbody>{''.join(parts)}
  </worldbody>
  <contact>
{chr(10).join(excludes)}
  </contact>{actuators_xml()}
</mujoco>
"""
