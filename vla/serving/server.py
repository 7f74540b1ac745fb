"""Serve a policy over websocket + msgpack (openpi's wire style), and the matching client.

Wire protocol (version 1). Every message is one binary websocket frame holding a msgpack map;
numpy arrays travel as ``{"__ndarray__": True, "data": bytes, "dtype": str, "shape": [...]}``
(our own small codec: :func:`pack` / :func:`unpack`; object dtypes are refused, no pickle). The
decoder also reads openpi's spelling of the same map (bytes keys ``b"__ndarray__"``, ...) and its
numpy scalars (``b"__npgeneric__"``).

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
   model predicts frames), "timing": {"infer_ms": float, "server_ms": float, "batch_size": int}}``.
3. A request that cannot be decoded or fails validation (missing keys, wrong dtype or shape,
   unknown or missing camera names, non-string instruction) gets ``{"error": "..."}`` naming the
   key, what was expected and what came; the connection stays open and the server keeps serving.
   A frame larger than ``max_message_bytes`` makes the websocket library close that connection
   with code 1009 (message too big) before the payload is buffered; other connections are
   unaffected. ``GET /healthz`` answers 200 ``ok``.

``protocol="openpi"`` (``vla serve protocol=openpi``) answers openpi clients unmodified instead:
flat requests mapped by :class:`vla.serving.openpi.OpenpiMapping`, replies ``{"actions", "plan",
"server_timing"}`` packed in openpi's style, errors as a text frame then close code 1011.

Authentication: with an API key, the websocket handshake must carry ``Authorization: Api-Key
<key>`` (openpi's header) or gets HTTP 401. The server binds 127.0.0.1 unless told otherwise, and
refuses another address without a key unless ``allow_no_auth`` says the network is trusted.
"""

from __future__ import annotations

import logging
import queue
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


def _encode_openpi(obj: Any) -> Any:
    # openpi's msgpack_numpy spells the ndarray map with bytes keys; its clients look only for those.
    out = _encode(obj)
    if isinstance(out, dict):
        return {k.encode(): v for k, v in out.items()}
    return out


def _field(obj: dict, key: str) -> Any:
    """``obj[key]`` under either key style (str keys: ours; bytes keys: openpi's msgpack_numpy)."""
    if key in obj:
        return obj[key]
    return obj[key.encode()]


def _decode(obj: dict) -> Any:
    if obj.get("__npgeneric__", obj.get(b"__npgeneric__")) is True:  # openpi's numpy scalars
        try:
            dtype = np.dtype(_field(obj, "dtype"))
            if dtype.hasobject or dtype.kind in "OV":
                raise ValueError(f"dtype {dtype} is not allowed")
            return dtype.type(_field(obj, "data"))
        except (KeyError, TypeError, ValueError) as e:
            raise CodecError(f"malformed numpy scalar: {e}") from None
    if obj.get("__ndarray__", obj.get(b"__ndarray__")) is not True:
        return obj
    try:
        dtype = np.dtype(_field(obj, "dtype"))
        shape = tuple(int(d) for d in _field(obj, "shape"))
        data = _field(obj, "data")
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


def pack(obj: Any, style: str = "vla") -> bytes:
    """Serialize maps/lists/scalars/strings/bytes and numpy arrays to msgpack bytes.

    ``style="openpi"`` writes the ndarray maps with bytes keys, as openpi's ``msgpack_numpy`` does
    (its clients decode nothing else); :func:`unpack` reads both styles.
    """
    import msgpack

    if style not in ("vla", "openpi"):
        raise ValueError(f"pack: style must be 'vla' or 'openpi', got {style!r}")
    return msgpack.packb(obj, default=_encode_openpi if style == "openpi" else _encode, use_bin_type=True)


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


def read_api_key(path: str) -> str:
    """The key in ``path`` (surrounding whitespace dropped); errors name the file."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"api_key_file: {p} is not a file")
    key = p.read_text().strip()
    if not key or any(c.isspace() for c in key):
        got = "nothing" if not key else "spaces"
        raise ValueError(f"api_key_file: {p} must hold one key without spaces, got {got}")
    return key


# ---- server -------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


class _Job:
    """One validated request waiting for the model (filled in by :meth:`PolicyServer._run_jobs`)."""

    __slots__ = ("slot", "req", "done", "chunk", "error", "infer_ms", "batch_size")

    def __init__(self, slot: int, req: dict) -> None:
        self.slot, self.req = slot, req
        self.done = threading.Event()
        self.chunk: Any = None
        self.error: str | None = None
        self.infer_ms = 0.0
        self.batch_size = 0


class PolicyServer:
    """A websocket server around a :class:`~vla.policies.VLAPolicy` (or any policy with ``metadata()``).

    One thread per connection (websockets' sync API); each connection gets its own policy slot, so
    plan state never leaks between clients. ``batching=True``: requests from all connections go to
    one queue; a batcher thread takes the first, collects more for up to ``batch_wait_ms`` (or
    until ``max_batch``, or until every open connection has a request in: nobody else can send, so a
    lone client never waits) and answers them with one batched ``predict_chunks`` call. Requests with a
    ``noise_seed`` run alone (their noise is drawn from that seed for a batch of one, exactly as
    unbatched). ``batching=False``: each connection calls the model itself, one at a time.

    ``protocol="openpi"`` speaks openpi's dialect (:mod:`vla.serving.openpi`). ``api_key``: clients
    must send ``Authorization: Api-Key <key>`` (openpi's header) or get HTTP 401. A non-loopback
    ``host`` without a key is refused unless ``allow_no_auth=True``.
    """

    def __init__(
        self,
        policy: PolicyProtocol,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        protocol: str = "vla",
        openpi: dict | None = None,
        api_key: str | None = None,
        allow_no_auth: bool = False,
        batching: bool = True,
        max_batch: int = 16,
        batch_wait_ms: float = 10.0,
    ) -> None:
        if protocol not in ("vla", "openpi"):
            raise ValueError(f"protocol: expected 'vla' or 'openpi', got {protocol!r}")
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key: expected a non-empty key (the key file is empty?)")
        if not is_loopback(host) and api_key is None and not allow_no_auth:
            raise ValueError(f"host={host} accepts connections from other machines and no API key is set; give "
                             f"api_key_file=PATH (clients send 'Authorization: Api-Key <key>'), or allow_no_auth=true "
                             f"on a trusted network, or bind host=127.0.0.1")
        if int(max_batch) < 1 or float(batch_wait_ms) < 0:
            raise ValueError(f"max_batch >= 1 and batch_wait_ms >= 0 expected, got {max_batch}, {batch_wait_ms}")
        self.policy = policy
        self.host = host
        self.port = int(port)
        self.max_message_bytes = int(max_message_bytes)
        self.protocol = protocol
        self.api_key = api_key
        self.batching, self.max_batch, self.batch_wait_s = bool(batching), int(max_batch), float(batch_wait_ms) / 1e3
        meta = dict(policy.metadata())
        self.cameras = {str(k): (int(v[0]), int(v[1])) for k, v in meta["cameras"].items()}
        self.state_dim = int(meta["state_dim"])
        self.n_obs_steps = int(meta.get("n_obs_steps", 1))
        self.openpi = None
        if protocol == "openpi":
            from vla.serving.openpi import OpenpiMapping

            if self.n_obs_steps != 1:
                # openpi clients send one frame per request; the history would have to live here.
                raise ValueError(f"protocol=openpi serves models with n_obs_steps=1, this one has {self.n_obs_steps}")
            self.openpi = OpenpiMapping.from_config(openpi, self.cameras)
        import vla

        self.metadata = {
            "protocol": PROTOCOL_VERSION,
            "wire": protocol,
            "vla_version": vla.__version__,
            "max_message_bytes": self.max_message_bytes,
            **meta,
        }
        self._lock = threading.Lock()  # guards the policy (model calls and slot resets)
        self._slot_lock = threading.Lock()
        self._next_slot = 0
        self._open = 0  # connections now open: a batch that holds a request from each is complete
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._server = None
        self._thread: threading.Thread | None = None
        self._batcher: threading.Thread | None = None

    # The websockets process_request hook: health check, and the API key before the handshake.
    def _process_request(self, connection: Any, request: Any) -> Any:
        import hmac
        from http import HTTPStatus

        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if self.api_key is not None:
            sent = request.headers.get("Authorization") or ""
            if not hmac.compare_digest(sent.encode(), f"Api-Key {self.api_key}".encode()):
                log.warning("refused %s: %s API key", getattr(connection, "remote_address", None),
                            "wrong" if sent else "missing")
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong API key: send the header "
                                          "'Authorization: Api-Key <key>'\n")
        return None

    def _handle(self, connection: Any) -> None:
        with self._slot_lock:
            slot = self._next_slot
            self._next_slot += 1
            self._open += 1
        peer = getattr(connection, "remote_address", None)
        log.info("client %s connected (slot %d)", peer, slot)
        style = "openpi" if self.protocol == "openpi" else "vla"
        try:
            connection.send(pack(self.metadata, style))
            prev_total_ms = None
            for message in connection:
                t0 = time.perf_counter()
                reply = self._reply(message, slot, t0)
                if "error" in reply and self.protocol == "openpi":
                    # openpi's convention: the error text in a text frame, then close with 1011.
                    connection.send(reply["error"])
                    connection.close(1011, "request refused; the error is in the previous frame")
                    return
                if self.protocol == "openpi":
                    timing = reply.pop("timing")
                    reply["server_timing"] = {"infer_ms": timing["infer_ms"], "server_ms": timing["server_ms"]}
                    if prev_total_ms is not None:
                        reply["server_timing"]["prev_total_ms"] = prev_total_ms
                connection.send(pack(reply, style))
                prev_total_ms = (time.perf_counter() - t0) * 1e3
        except Exception as e:  # ConnectionClosed and friends end this client only
            log.info("client %s: %s: %s", peer, type(e).__name__, e)
        finally:
            with self._slot_lock:
                self._open -= 1
            with self._lock:
                self.policy.reset(slot)

    def _parse(self, message: bytes | str) -> dict:
        if isinstance(message, str):
            raise RequestError("expected a binary msgpack frame, got a text frame")
        msg = unpack(message)
        if self.openpi is not None:
            msg = self.openpi.to_request(msg, self.cameras, self.state_dim)
        return validate_request(msg, self.cameras, self.state_dim, self.n_obs_steps)

    def _reply(self, message: bytes | str, slot: int, t0: float) -> dict:
        try:
            req = self._parse(message)
        except ValueError as e:
            return {"error": str(e)}
        job = _Job(slot, req)
        if self.batching:
            self._queue.put(job)
            job.done.wait()
        else:
            self._run_jobs([job])
        if job.error is not None:
            return {"error": job.error}
        chunk = job.chunk
        out: dict[str, Any] = {"actions": chunk.actions.astype(np.float32), "plan": chunk.plan}
        if chunk.frame is not None:
            out["frame"] = chunk.frame
        out["timing"] = {"infer_ms": job.infer_ms, "server_ms": (time.perf_counter() - t0) * 1e3,
                         "batch_size": job.batch_size}
        return out

    def _batch_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            deadline = time.perf_counter() + self.batch_wait_s
            while len(jobs) < min(self.max_batch, max(1, self._open)):
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after answering these
                    break
                jobs.append(nxt)
            try:
                self._run_jobs(jobs)
            finally:
                for job in jobs:
                    job.done.set()

    def _run_jobs(self, jobs: list[_Job]) -> None:
        """Answer ``jobs``: one model call per group of equal ``decode_plan``; seeded requests alone."""
        groups: dict[Any, list[_Job]] = {}
        for job in jobs:
            seed = job.req.get("noise_seed")
            key = ("seed", id(job)) if seed is not None else ("plan", bool(job.req.get("decode_plan", True)))
            groups.setdefault(key, []).append(job)
        for group in groups.values():
            try:
                self._call_model(group)
            except Exception as e:
                if len(group) > 1:  # find the request that fails; the others still get answers
                    for job in group:
                        self._run_jobs_alone(job)
                else:
                    self._fail(group[0], e)

    def _run_jobs_alone(self, job: _Job) -> None:
        try:
            self._call_model([job])
        except Exception as e:
            self._fail(job, e)

    @staticmethod
    def _fail(job: _Job, e: Exception) -> None:
        if isinstance(e, ValueError):
            job.error = str(e)
        else:  # a model failure must not take the server down
            log.error("inference failed: %s: %s", type(e).__name__, e, exc_info=e)
            job.error = f"internal error: {type(e).__name__}: {e}"

    def _call_model(self, group: list[_Job]) -> None:
        with self._lock:
            for job in group:
                if job.req.get("reset"):
                    self.policy.reset(job.slot)
            t1 = time.perf_counter()
            chunks = self.policy.predict_chunks(
                [j.req["observation"] for j in group],
                [j.req["instruction"] for j in group],
                env_indices=[j.slot for j in group],
                decode_plan=group[0].req.get("decode_plan", True),
                noise_seed=group[0].req.get("noise_seed"),
            )
            infer_ms = (time.perf_counter() - t1) * 1e3
        for job, chunk in zip(group, chunks):
            job.chunk, job.infer_ms, job.batch_size = chunk, infer_ms, len(group)

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
        if self.batching:
            self._batcher = threading.Thread(target=self._batch_loop, name="vla-serve-batcher", daemon=True)
            self._batcher.start()
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
        if self._batcher is not None:
            self._queue.put(None)
            self._batcher.join(5)
            self._batcher = None

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- client -------------------------------------------------------------------------------------
class PolicyClient:
    """Synchronous client: connects, reads the metadata, then one request -> one reply.

    ``api_key`` is sent as ``Authorization: Api-Key <key>`` (the header openpi clients send).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, timeout: float = 30.0,
                 api_key: str | None = None) -> None:
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        self.uri = f"ws://{host}:{int(port)}"
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        try:
            self._conn = connect(self.uri, max_size=None, compression=None, open_timeout=timeout,
                                 additional_headers=headers)
        except InvalidStatus as e:
            status = e.response.status_code
            why = " (missing or wrong API key)" if status == 401 else ""
            raise ValueError(f"vla server at {self.uri} refused the connection: HTTP {status}{why}") from None
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
