"""A :class:`Policy` that asks a running ``vla serve`` for its action chunks.

Same interface as the local VLA policy: the action queue and temporal ensembling run here, on the
client, and a request goes out only when a queue runs dry. Plans are re-decoded on the server every
``replan_every`` env steps (``decode_plan`` in the request; in between the server reuses this
connection's last plan). One websocket connection per env slot, so per-env plan state stays
separate on the server. Wire format: see :mod:`vla.serving`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Chunk, Observation, Policy


class RemotePolicy(Policy):
    """Client of ``vla serve``: ``RemotePolicy("127.0.0.1", 8000, n_action_steps=8)``.

    ``api_key``: sent as ``Authorization: Api-Key <key>`` to a server started with ``api_key_file``.
    """

    name = "remote"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        n_action_steps: int | None = None,
        replan_every: int | None = None,
        temporal_ensemble: float | None = None,
        timeout: float = 30.0,
        api_key: str | None = None,
    ) -> None:
        from vla.serving import PolicyClient

        self.host, self.port, self.timeout, self.api_key = host, int(port), timeout, api_key
        self._clients: dict[int, PolicyClient] = {0: PolicyClient(host, port, timeout, api_key)}
        self.metadata = dict(self._clients[0].metadata)
        horizon = int(self.metadata["horizon"])
        n_action_steps = int(n_action_steps or self.metadata.get("n_action_steps") or horizon)
        if n_action_steps > horizon:
            raise ValueError(f"n_action_steps={n_action_steps} exceeds the served model's horizon {horizon}")
        super().__init__(n_action_steps, temporal_ensemble)
        self.n_obs_steps = int(self.metadata.get("n_obs_steps", 1))  # history is kept here and sent stacked
        self.replan_every = int(replan_every or self.metadata.get("replan_every") or n_action_steps)
        self._fresh: set[int] = {0}  # slots whose next request must reset the server-side state

    @property
    def cameras(self) -> dict[str, tuple[int, int]]:
        return {k: (int(v[0]), int(v[1])) for k, v in self.metadata["cameras"].items()}

    def env_kwargs(self) -> dict[str, Any]:
        """``make_env`` keyword arguments matching the served model (cameras, image size, env options)."""
        return {**(self.metadata.get("env_options") or {}), "cameras": tuple(self.cameras),
                "image_size": int(self.metadata["image_size"])}

    def _client(self, slot: int) -> Any:
        if slot not in self._clients:
            from vla.serving import PolicyClient

            self._clients[slot] = PolicyClient(self.host, self.port, self.timeout, self.api_key)
            self._fresh.add(slot)
        return self._clients[slot]

    def reset(self, env_index: int | None = None) -> None:
        super().reset(env_index)
        self._fresh.update(self._clients if env_index is None else [int(env_index)])

    def predict_chunks(
        self,
        obs_list: list[Observation],
        instructions: list[str],
        infos: list[dict] | None = None,
        env_indices: list[int] | None = None,
        decode_plan: bool | None = None,
        noise_seed: int | None = None,
    ) -> list[Chunk]:
        env_indices = list(range(len(obs_list))) if env_indices is None else env_indices
        chunks = []
        for obs, instruction, slot in zip(obs_list, instructions, env_indices):
            s = self.slot(slot)
            replan = s.plan is None or s.steps - s.plan_step >= self.replan_every
            obs = self.stacked_observation(slot, obs)
            request: dict[str, Any] = {
                "observation": {"images": dict(obs["images"]), "state": np.asarray(obs["state"], np.float32)},
                "instruction": instruction,
                "reset": slot in self._fresh,
                "decode_plan": bool(replan if decode_plan is None else decode_plan),
            }
            if noise_seed is not None:
                request["noise_seed"] = int(noise_seed)
            reply = self._client(slot).infer(request)
            self._fresh.discard(slot)
            if request["decode_plan"]:
                s.plan_step = s.steps
            frame = reply.get("frame")
            chunks.append(Chunk(np.asarray(reply["actions"], np.float32), plan=reply.get("plan"), frame=frame))
        return chunks

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
