"""Fast headless camera rendering for MuJoCo envs (MetaWorld, the tabletop suite).

One :class:`CameraRenderer` owns one ``mujoco.Renderer`` and renders several named cameras of
one model per call. It turns on the settings that make CPU rendering (EGL/OSMesa on llvmpipe)
about ten times faster — no shadows, no reflections, no multisampling (``offsamples = 0``) —
and turns the cameras whose image comes out upside down so every image is upright.

Upside-down cameras (MetaWorld's ``corner*`` views) are found from the camera frame itself: a
camera whose image "up" axis points below the horizon is rolled by about 180 degrees, so its image
is rotated by 180 degrees (rows *and* columns reversed). Reversing only the rows would also make
the view upright but mirrored, swapping left and right relative to the world — wrong for
instructions like "the left bin".

Pick the backend with ``MUJOCO_GL`` (``egl`` or ``osmesa``) *before* mujoco is imported.
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

# Renderers still open at interpreter exit are closed before the GL library is torn down;
# otherwise mujoco's own finalizer prints EGL errors during shutdown. atexit runs hooks last-in
# first-out, so the hook is registered when the first renderer is made, after mujoco's GL backend
# has registered its own teardown.
_LIVE_RENDERERS: weakref.WeakSet = weakref.WeakSet()
_EXIT_HOOK_REGISTERED = False


def _close_live_renderers() -> None:
    for renderer in list(_LIVE_RENDERERS):
        renderer.close()


def _track(renderer: CameraRenderer) -> None:
    global _EXIT_HOOK_REGISTERED
    _LIVE_RENDERERS.add(renderer)
    if not _EXIT_HOOK_REGISTERED:
        atexit.register(_close_live_renderers)
        _EXIT_HOOK_REGISTERED = True


def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``64`` -> ``(64, 64)``; ``(48, 64)`` -> ``(48, 64)`` (height, width)."""
    if isinstance(image_size, int | np.integer):
        h = w = int(image_size)
    else:
        vals = [int(v) for v in image_size]
        if len(vals) != 2:
            raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
        h, w = vals
    if h < 8 or w < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {(h, w)}")
    return h, w


def configure_fast_rendering(model: Any, height: int, width: int) -> None:
    """Disable multisampling and grow the offscreen buffer to fit ``height x width``."""
    model.vis.quality.offsamples = 0
    model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), width)
    model.vis.global_.offheight = max(int(model.vis.global_.offheight), height)


class CameraRenderer:
    """Render named cameras of ``model``/``data`` as upright ``uint8[H, W, 3]`` arrays.

    ``rotate_cameras``: cameras whose raw image is upside down and gets rotated by 180 degrees;
    ``None`` (default) detects them from the camera orientation at the first render.
    """

    def __init__(
        self,
        model: Any,
        cameras: Sequence[str],
        image_size: int | Sequence[int] = 64,
        rotate_cameras: Iterable[str] | None = None,
    ) -> None:
        import mujoco

        self.height, self.width = image_hw(image_size)
        self.cameras = tuple(cameras)
        available = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
        unknown = [c for c in self.cameras if c not in available]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; this scene has {available}")
        self._rotate = None if rotate_cameras is None else frozenset(rotate_cameras)
        self._camera_ids = {c: mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, c) for c in self.cameras}
        configure_fast_rendering(model, self.height, self.width)
        self._renderer = mujoco.Renderer(model, height=self.height, width=self.width)
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        _track(self)

    def render(self, data: Any) -> dict[str, np.ndarray]:
        """Render every camera for the current ``data`` (call after ``mj_forward``/``mj_step``)."""
        if self._rotate is None:
            self._rotate = frozenset(c for c in self.cameras if self._is_upside_down(data, self._camera_ids[c]))
        images = {}
        for cam in self.cameras:
            self._renderer.update_scene(data, camera=self._camera_ids[cam])
            img = self._renderer.render()  # (H, W, 3) uint8, a fresh array per call
            if cam in self._rotate:
                img = np.ascontiguousarray(img[::-1, ::-1])  # (H, W, 3) rotated 180 degrees -> upright
            images[cam] = img
        return images

    @property
    def rotated_cameras(self) -> frozenset[str]:
        """Cameras rotated by 180 degrees (known after the first render when auto-detected)."""
        return self._rotate or frozenset()

    @staticmethod
    def _is_upside_down(data: Any, cam_id: int) -> bool:
        up = np.asarray(data.cam_xmat[cam_id]).reshape(3, 3)[:, 1]  # camera +y (image up) in world frame
        return bool(up[2] < -0.1)

    def close(self) -> None:
        renderer, self._renderer = getattr(self, "_renderer", None), None
        if renderer is not None:
            try:
                renderer.close()
            except Exception:  # GL context already gone (interpreter shutdown)
                pass

    def __del__(self) -> None:  # the renderer holds a GL context; free it with the env
        self.close()


def camera_projection(model: Any, data: Any, camera: str, image_size: int | Sequence[int],
                      rotated: bool = False) -> np.ndarray:
    """The 3x4 matrix P that maps a world point (x, y, z, 1) to ``w * (column, row, 1)`` in ``camera``'s
    image at ``image_size`` as :class:`CameraRenderer` returns it (row 0 at the top; ``rotated``: the
    image was turned by 180 degrees). Pinhole model from the camera's pose in ``data`` (after
    ``mj_forward``) and its vertical field of view; pixel centres sit at half-integers."""
    import mujoco

    cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    if cam < 0:
        raise ValueError(f"camera_projection: the model has no camera {camera!r}")
    h, w = image_hw(image_size)
    f = 0.5 * h / np.tan(np.deg2rad(float(model.cam_fovy[cam])) / 2)  # focal length in pixels
    rot = np.asarray(data.cam_xmat[cam], np.float64).reshape(3, 3)  # columns: camera x (right), y (up), z (back)
    pos = np.asarray(data.cam_xpos[cam], np.float64)
    # camera coordinates c = R^T (p - pos); pixel column = w/2 + f cx / -cz, row = h/2 - f cy / -cz
    k = np.array([[f, 0.0, w / 2], [0.0, -f, h / 2], [0.0, 0.0, 1.0]]) @ np.diag([1.0, 1.0, -1.0])
    p = k @ np.hstack([rot.T, -(rot.T @ pos)[:, None]])  # (3, 4)
    if rotated:  # (col, row) -> (w - col, h - row)
        p = np.array([[-1.0, 0.0, w], [0.0, -1.0, h], [0.0, 0.0, 1.0]]) @ p
    return p


def project_points(p: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Pixel (column, row) f32[..., 2] of world points ``xyz`` [..., 3] through a `camera_projection` P."""
    xyz = np.asarray(xyz, np.float64)
    uvw = xyz @ p[:, :3].T + p[:, 3]  # (..., 3)
    return (uvw[..., :2] / uvw[..., 2:3]).astype(np.float32)
