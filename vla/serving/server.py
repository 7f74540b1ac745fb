"""Serve a policy over websocket + msgpack (openpi's wire style), and the matching client.

Wire protocol (version 1). Every message is one binary websocket frame holding a msgpack map;
numpy arrays travel as ``{"__ndarray__": True, "data": bytes, "dtype": str, "shape": [...]}``
(our own small codec: :func:`pack` / :func:`unpack`; object dtypes are refused, no pickle).

1. On connect the server sends a metadata map first: ``protocol``, ``vla_version``, ``cameras``
   ``{name: [H, W]}``, ``image_size``, ``state_dim``, ``action_dim``, ``horizon``,
   ``n_action_steps``, ``has_planner``, ``has_frame_head``, ``max_message_bytes`` and
   ``model_config``.
2. Each request::

       {"observation": {"images": {cam: u8[H, W, 3]}, "state": f32[S]},   # raw env units
        "instruction": str,     # n_obs_steps = T > 1: images u8[T, H, W, 3], state f32[T, S]
        "reset": bool            # optional: forget this connection's plan state first
        "decode_plan": bool      # optional: default True; False reuses the connection's last plan
        "noise_seed": int}       # optional: draw the flow-matching noise from this seed

   gets ``{"actions": f32[H, A], "plan": [str, ...] | None, "frame": u8[h, w, 3] (only when the
   model predicts frames), "timing": {"infer_ms": float, "server_ms": float}}``.
3. A request that cannot be decoded or fails validation (missing keys, wrong dtype or shape,
   unknown or missing camera names, non-string instruction) gets ``{"error": "..."}`` naming the
   key, what was expected and what came; the connection stays open and the server keeps serving.
   A frame larger than ``max_message_bytes`` makes the websocket library close that connection
   with code 1009 (message too big) before the payload is buffered; other connections are
   unaffected. ``GET /healthz`` answers 200 ``ok``.

The server binds 127.0.0.1 unless told otherwise: a policy server has no authentication.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from vla.policies.base import PolicyProtocol

PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

log = logging.getLogger(__name__)


# ---- msgpack-numpy codec ------------------------------------------------------------------------
class CodecError(ValueError):
    """Bytes that do not decode to a valid message (bad msgpack, or an inconsistent ndarray)."""


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "OV" or obj.dtype.hasobject:
            raise TypeError(f"cannot send an ndarray of dtype {obj.dtype} (object/void dtypes are not supported)")
        arr = np.ascontiguousarray(obj)
        return {"__ndarray__": True, "data": arr.tobytes(), "dtype": arr.dtype.str, "shape": list(arr.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot serialize an object of type {type(obj).__name__}")


def _decode(obj: dict) -> Any:
    if obj.get("__ndarray__") is not True:
        return obj
    try:
        dtype = np.dtype(obj["dtype"])
        shape = tuple(int(d) for d in obj["shape"])
        data = obj["data"]
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"malformed ndarray: {e}") from None
    if dtype.hasobject or dtype.kind in "OV":
        raise CodecError(f"malformed ndarray: dtype {dtype} is not allowed")
    if not isinstance(data, bytes | bytearray) or any(d < 0 for d in shape):
        raise CodecError("malformed ndarray: expected bytes data and a non-negative shape")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise CodecError(f"malformed ndarray: shape {list(shape)} of {dtype} needs {expected} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def pack(obj: Any) -> bytes:
    """Serialize maps/lists/scalars/strings/bytes and numpy arrays to msgpack bytes."""
    import msgpack

    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """Inverse of :func:`pack`. Raises :class:`CodecError` (a ``ValueError``) for bytes that are not a valid message."""
    import msgpack

    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False, strict_map_key=False)
    except CodecError:
        raise
    except Exception as e:  # msgpack raises several unrelated exception types for garbage
        raise CodecError(f"not a msgpack message: {type(e).__name__}: {e}") from None


# ---- request validation -------------------------------------------------------------------------
class RequestError(ValueError):
    """A request the server refuses; the message goes back to the client as ``{"error": ...}``."""


def validate_request(req: Any, cameras: dict[str, tuple[int, int]], state_dim: int, n_obs_steps: int = 1) -> dict:
    """Check one decoded request against the served model; returns it with the state as f32[S].

    Images must be uint8 [H, W, 3] at exactly the model's cameras and sizes; the state a float
    vector of ``state_dim`` (float64 is accepted and cast); the instruction a non-empty string.
    Models with ``n_obs_steps = T > 1`` take the history stacked: u8[T, H, W, 3] and f32[T, S].
    """
    from vla.observation import ObservationError, ObservationSpec, validate_observation

    if not isinstance(req, dict):
        raise RequestError(f"request: expected a map, got {type(req).__name__}")
    for key in ("observation", "instruction"):
        if key not in req:
            raise RequestError(f"request: missing key '{key}' (expected observation, instruction)")
    instruction = req["instruction"]
    if not isinstance(instruction, str) or not instruction.strip():
        raise RequestError(f"request['instruction']: expected a non-empty string, got {instruction!r:.80}")
    spec = ObservationSpec({c: tuple(hw) for c, hw in cameras.items()}, int(state_dim), int(n_obs_steps))
    try:
        # a remote client sends the history stacked (it keeps the frames), hence stacked=True
        obs = validate_observation(req["observation"], spec, "observation", strict=True, stacked=True)
    except ObservationError as e:
        raise RequestError(str(e)) from None
    for key, kind in (("reset", bool), ("decode_plan", bool), ("noise_seed", int)):
        if key in req and not isinstance(req[key], kind):
            raise RequestError(f"request['{key}']: expected {kind.__name__}, got {type(req[key]).__name__}")
    out = dict(req)
    out["observation"] = obs
    return out


# ---- server -------------------------------------------------------------------------------------
class PolicyServer:
    """A websocket server around a :class:`~vla.policies.VLAPolicy` (or any policy with ``metadata()``).

    One thread per connection (websockets' sync API); model calls are serialized by a lock. Each
    connection gets its own policy slot, so plan state never leaks between clients.
    """

    def __init__(
        self,
        policy: PolicyProtocol,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.policy = policy
        self.host = host
        self.port = int(port)
        self.max_message_bytes = int(max_message_bytes)
        meta = dict(policy.metadata())
        self.cameras = {str(k): (int(v[0]), int(v[1])) for k, v in meta["cameras"].items()}
        self.state_dim = int(meta["state_dim"])
        self.n_obs_steps = int(meta.get("n_obs_steps", 1))
        import vla

        self.metadata = {
            "protocol": PROTOCOL_VERSION,
            "vla_version": vla.__version__,
            "max_message_bytes": self.max_message_bytes,
            **meta,
        }
        self._lock = threading.Lock()
        self._next_slot = 0
        self._server = None
        self._thread: threading.Thread | None = None

    # The websockets process_request hook: plain HTTP health check next to the websocket endpoint.
    def _process_request(self, connection: Any, request: Any) -> Any:
        from http import HTTPStatus

        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        return None

    def _handle(self, connection: Any) -> None:
        with self._lock:
            slot = self._next_slot
            self._next_slot += 1
        peer = getattr(connection, "remote_address", None)
        log.info("client %s connected (slot %d)", peer, slot)
        try:
            connection.send(pack(self.metadata))
            for message in connection:
                connection.send(pack(self._reply(message, slot)))
        except Exception as e:  # ConnectionClosed and friends end this client only
            log.info("client %s: %s: %s", peer, type(e).__name__, e)
        finally:
            with self._lock:
                self.policy.reset(slot)

    def _reply(self, message: bytes | str, slot: int) -> dict:
        t0 = time.perf_counter()
        try:
            if isinstance(message, str):
                raise RequestError("expected a binary msgpack frame, got a text frame")
            req = validate_request(unpack(message), self.cameras, self.state_dim, self.n_obs_steps)
        except ValueError as e:
            return {"error": str(e)}
        try:
            with self._lock:
                if req.get("reset"):
                    self.policy.reset(slot)
                t1 = time.perf_counter()
                chunk = self.policy.predict_chunks(
                    [req["observation"]],
                    [req["instruction"]],
                    env_indices=[slot],
                    decode_plan=req.get("decode_plan", True),
                    noise_seed=req.get("noise_seed"),
                )[0]
                infer_ms = (time.perf_counter() - t1) * 1e3
        except ValueError as e:
            return {"error": str(e)}
        except Exception as e:  # a model failure must not take the server down
            log.exception("inference failed")
            return {"error": f"internal error: {type(e).__name__}: {e}"}
        out: dict[str, Any] = {"actions": chunk.actions.astype(np.float32), "plan": chunk.plan}
        if chunk.frame is not None:
            out["frame"] = chunk.frame
        out["timing"] = {"infer_ms": infer_ms, "server_ms": (time.perf_counter() - t0) * 1e3}
        return out

    def start(self) -> PolicyServer:
        """Bind and serve in a background thread (``port=0`` picks a free port; see ``self.port``)."""
        from websockets.sync.server import serve

        self._server = serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._process_request,
            max_size=self.max_message_bytes,
            compression=None,  # images are incompressible enough; deflate costs latency
        )
        self.port = int(self._server.socket.getsockname()[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="vla-serve", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Bind (unless :meth:`start` did already) and block until interrupted."""
        if self._server is None:
            self.start()
        assert self._thread is not None
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        finally:
            self.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- client -------------------------------------------------------------------------------------
class PolicyClient:
    """Synchronous client: connects, reads the metadata, then one request -> one reply."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, timeout: float = 30.0) -> None:
        from websockets.sync.client import connect

        self.uri = f"ws://{host}:{int(port)}"
        try:
            self._conn = connect(self.uri, max_size=None, compression=None, open_timeout=timeout)
        except OSError as e:
            raise ValueError(f"cannot connect to a vla server at {self.uri}: {e}") from None
        self.timeout = timeout
        self.metadata: dict = unpack(self._conn.recv(timeout=timeout))

    def infer(self, request: dict) -> dict:
        """Send one request; return the reply. A server-side ``{"error"}`` raises ``ValueError``."""
        self._conn.send(pack(request))
        reply = unpack(self._conn.recv(timeout=self.timeout))
        if isinstance(reply, dict) and "error" in reply:
            raise ValueError(f"server {self.uri}: {reply['error']}")
        return reply

    def close(self) -> None:
        self._conn.close()
