"""openpi wire compatibility for `vla serve protocol=openpi`: the request mapping.

openpi clients (``openpi_client.websocket_client_policy.WebsocketClientPolicy``) send one flat map
per step, e.g. LIBERO's::

    {"observation/image": u8[224, 224, 3], "observation/wrist_image": u8[224, 224, 3],
     "observation/state": f32[8], "prompt": "put the bowl on the plate"}

and expect ``{"actions": [H, A], "server_timing": {"infer_ms": ...}}`` back, with numpy arrays in
openpi's msgpack style (bytes keys: :func:`vla.serving.pack` with ``style="openpi"``). A request it
cannot serve gets the error text as a text frame and a close with code 1011 (internal error), which
the client raises as an exception. :class:`OpenpiMapping` turns the flat map into our request
(``observation.images`` per camera, ``observation.state``, ``instruction``); which openpi key feeds
which camera and which keys make up the state is configuration (``configs/serve.yaml``: ``openpi``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vla.serving.server import RequestError


@dataclass
class OpenpiMapping:
    """openpi request keys -> our observation.

    ``images``: openpi key -> our camera name; empty means ``observation/<camera>`` for every camera
    of the served model. ``state``: openpi keys concatenated in this order into our state vector
    (DROID sends ``observation/joint_position`` and ``observation/gripper_position``). ``prompt``:
    the key carrying the instruction; ``default_prompt`` is used when a request has none.
    ``resize``: images of another size (openpi clients usually send 224 x 224) are resized to the
    model's size (bilinear, antialiased); false refuses them.
    """

    images: dict[str, str] = field(default_factory=dict)
    state: list[str] = field(default_factory=lambda: ["observation/state"])
    prompt: str = "prompt"
    default_prompt: str | None = None
    resize: bool = True

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None, cameras: dict[str, tuple[int, int]]) -> OpenpiMapping:
        """Build and check the mapping against the served model's cameras (errors name the key)."""
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - {"images", "state", "prompt", "default_prompt", "resize"})
        if unknown:
            raise ValueError(f"openpi: unknown keys {unknown}; expected images, state, prompt, default_prompt, resize")
        images = {str(k): str(v) for k, v in (cfg.get("images") or {}).items()}
        if not images:
            images = {f"observation/{cam}": cam for cam in cameras}
        missing = sorted(set(cameras) - set(images.values()))
        extra = sorted(set(images.values()) - set(cameras))
        if missing or extra:
            raise ValueError(f"openpi.images: maps to cameras {sorted(set(images.values()))}, the model has "
                             f"{sorted(cameras)} (missing {missing}, unknown {extra})")
        state = cfg.get("state", ["observation/state"])
        state = [state] if isinstance(state, str) else [str(k) for k in state]
        if not state:
            raise ValueError("openpi.state: expected at least one request key, got []")
        return cls(images=images, state=state, prompt=str(cfg.get("prompt") or "prompt"),
                   default_prompt=cfg.get("default_prompt"), resize=bool(cfg.get("resize", True)))

    def to_request(self, msg: Any, cameras: dict[str, tuple[int, int]], state_dim: int) -> dict[str, Any]:
        """Our request (see :mod:`vla.serving.server`) from one openpi observation map."""
        if not isinstance(msg, dict):
            raise RequestError(f"openpi request: expected a map, got {type(msg).__name__}")
        missing = [k for k in (*self.images, *self.state) if k not in msg]
        if missing:
            raise RequestError(f"openpi request: missing keys {missing} (expected {[*self.images, *self.state]}"
                               f" and '{self.prompt}'; got {sorted(map(str, msg))})")
        images = {}
        for key, cam in self.images.items():
            images[cam] = self._image(msg[key], key, cameras[cam])
        parts = []
        for key in self.state:
            v = msg[key]
            if not isinstance(v, np.ndarray) or v.dtype.kind not in "fiub":
                got = f"{v.dtype}{list(v.shape)}" if isinstance(v, np.ndarray) else type(v).__name__
                raise RequestError(f"openpi request['{key}']: expected a numeric array, got {got}")
            parts.append(v.astype(np.float32).reshape(-1))
        state = np.concatenate(parts)  # (S,)
        if state.shape[0] != state_dim:
            sizes = {k: int(p.shape[0]) for k, p in zip(self.state, parts)}
            raise RequestError(f"openpi request: state keys {sizes} add up to {state.shape[0]} values, the model "
                               f"expects state_dim={state_dim}")
        prompt = msg.get(self.prompt, self.default_prompt)
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(f"openpi request['{self.prompt}']: expected a non-empty string, got {prompt!r:.80}")
        return {"observation": {"images": images, "state": state}, "instruction": prompt}

    def _image(self, img: Any, key: str, hw: tuple[int, int]) -> np.ndarray:
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
            got = f"{img.dtype}{list(img.shape)}" if isinstance(img, np.ndarray) else type(img).__name__
            raise RequestError(f"openpi request['{key}']: expected uint8[H, W, 3], got {got}")
        if tuple(img.shape[:2]) == tuple(hw):
            return img
        if not self.resize:
            raise RequestError(f"openpi request['{key}']: expected uint8[{hw[0]}, {hw[1]}, 3], got "
                               f"uint8{list(img.shape)} (set openpi.resize=true to resize on the server)")
        return resize_image(img, hw)


def resize_image(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8[H, W, 3] -> uint8[h, w, 3], bilinear with antialiasing (torch, already loaded by the model)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    y = F.interpolate(x, size=tuple(hw), mode="bilinear", antialias=True, align_corners=False)  # (1, 3, h, w)
    return y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
