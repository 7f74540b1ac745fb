"""Serving: msgpack-numpy codec, request validation, the websocket server and its client."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from vla.policies import Chunk, Policy

from vla.serving import PolicyClient, PolicyServer, RequestError, pack, unpack, validate_request

CAMS = {"corner": (8, 8)}


def test_codec_round_trip():
    msg = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": {"img": np.zeros((2, 2, 3), np.uint8), "i": np.int64(3), "f": np.float32(0.5)},
        "s": "text", "l": [1, (2, 3)], "empty": np.zeros((0, 4), np.float64), "bytes": b"\x00\x01",
    }
    out = unpack(pack(msg))
    assert out["a"].dtype == np.float32 and np.array_equal(out["a"], msg["a"])
    assert out["b"]["img"].shape == (2, 2, 3) and out["b"]["img"].dtype == np.uint8
    assert out["b"]["i"] == 3 and out["b"]["f"] == 0.5
    assert out["s"] == "text" and out["l"] == [1, [2, 3]] and out["bytes"] == b"\x00\x01"
    assert out["empty"].shape == (0, 4)
    be = np.arange(3, dtype=">i4")
    assert np.array_equal(unpack(pack(be)), be)


def test_codec_refuses_objects_and_bad_arrays():
    with pytest.raises(TypeError, match="object"):
        pack(np.array([{}], dtype=object))
    with pytest.raises(TypeError, match="set"):
        pack({1, 2})
    import msgpack

    bad = msgpack.packb({"__ndarray__": True, "data": b"\x00" * 5, "dtype": "<f4", "shape": [2]})
    with pytest.raises(ValueError, match="needs 8 bytes"):
        unpack(bad)
    obj = msgpack.packb({"__ndarray__": True, "data": b"", "dtype": "|O", "shape": [0]})
    with pytest.raises(ValueError, match="not allowed"):
        unpack(obj)
    with pytest.raises(ValueError, match="msgpack"):
        unpack(b"\xc1\xc1garbage")


def _request(**over):
    req = {"observation": {"images": {"corner": np.zeros((8, 8, 3), np.uint8)}, "state": np.zeros(4, np.float32)},
           "instruction": "open the drawer"}
    req.update(over)
    return req


@pytest.mark.parametrize(
    "req,match",
    [
        ([1, 2], "expected a map"),
        ({"instruction": "x"}, "missing key 'observation'"),
        (_request(instruction=""), "non-empty string"),
        (_request(observation={"images": {}}), "missing key 'state'"),
        (_request(observation={"images": {"wrist": np.zeros((8, 8, 3), np.uint8)}, "state": np.zeros(4)}),
         r"expected cameras \['corner'\], got \['wrist'\]"),
        (_request(observation={"images": {"corner": np.zeros((8, 8, 3), np.float32)}, "state": np.zeros(4)}),
         r"expected uint8\[8, 8, 3\], got float32\[8, 8, 3\]"),
        (_request(observation={"images": {"corner": np.zeros((8, 9, 3), np.uint8)}, "state": np.zeros(4)}),
         r"got uint8\[8, 9, 3\]"),
        (_request(observation={"images": {"corner": np.zeros((8, 8, 3), np.uint8)}, "state": np.zeros(5)}),
         r"state'\]: expected float32\[4\], got float64\[5\]"),
        (_request(observation={"images": {"corner": np.zeros((8, 8, 3), np.uint8)}, "state": [0, 0, 0, 0]}),
         r"got list"),
        (_request(reset="yes"), "'reset'.*bool"),
    ],
)
def test_validate_request_errors(req, match):
    with pytest.raises(RequestError, match=match):
        validate_request(req, CAMS, 4)


def test_validate_request_casts_state():
    out = validate_request(_request(observation={"images": {"corner": np.zeros((8, 8, 3), np.uint8)},
                                                 "state": np.ones(4)}), CAMS, 4)
    assert out["observation"]["state"].dtype == np.float32


class EchoPolicy(Policy):
    """Returns the state (repeated over a horizon of 3) as actions; the plan echoes the instruction."""

    def metadata(self):
        return {"cameras": {"corner": [8, 8]}, "image_size": 8, "state_dim": 4, "action_dim": 4, "horizon": 3,
                "n_action_steps": 2, "has_planner": True, "has_frame_head": False, "model_config": {}}

    def predict_chunks(self, obs_list, instructions, infos=None, env_indices=None, decode_plan=True,
                       noise_seed=None):
        return [Chunk(np.repeat(o["state"][None], 3, 0), plan=[s, str(decode_plan)]) for o, s in
                zip(obs_list, instructions)]


def test_server_round_trip_errors_and_health():
    import websockets.exceptions
    from websockets.sync.client import connect

    with PolicyServer(EchoPolicy(), port=0, max_message_bytes=64 * 1024) as server:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5).read()
        assert body.strip() == b"ok"
        client = PolicyClient("127.0.0.1", server.port)
        assert client.metadata["protocol"] == 1 and client.metadata["horizon"] == 3
        assert client.metadata["cameras"] == {"corner": [8, 8]}
        state = np.arange(4, dtype=np.float32)
        req = _request(observation={"images": {"corner": np.zeros((8, 8, 3), np.uint8)}, "state": state})
        reply = client.infer(req)
        assert reply["actions"].shape == (3, 4) and np.array_equal(reply["actions"][1], state)
        assert reply["plan"] == ["open the drawer", "True"] and reply["timing"]["infer_ms"] >= 0
        # malformed, wrong-shape and garbage requests: an error reply, the connection keeps working
        with pytest.raises(ValueError, match="missing key 'instruction'"):
            client.infer({"observation": {}})
        with pytest.raises(ValueError, match=r"uint8\[8, 8, 3\]"):
            client.infer(_request(observation={"images": {"corner": np.zeros((4, 4, 3), np.uint8)}, "state": state}))
        client._conn.send(b"\xc1 not msgpack")
        assert "msgpack" in unpack(client._conn.recv(timeout=5))["error"]
        client._conn.send("text frame")
        assert "binary" in unpack(client._conn.recv(timeout=5))["error"]
        assert np.array_equal(client.infer(req)["actions"][0], state)
        # oversized: that connection is closed with 1009, everyone else is still served
        with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as big:
            big.recv(timeout=5)  # metadata
            big.send(pack(_request(pad=np.zeros(200_000, np.uint8))))
            with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
                big.recv(timeout=5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        assert client.infer(_request(decode_plan=False))["plan"] == ["open the drawer", "False"]
        other = PolicyClient("127.0.0.1", server.port)
        assert other.infer(req)["actions"].shape == (3, 4)
        other.close()
        client.close()
    with pytest.raises(ValueError, match="cannot connect"):
        PolicyClient("127.0.0.1", server.port, timeout=2)


# ---- the real thing: a tiny VLA behind the server, RemotePolicy as the client ----------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from _tiny_vla import make_tiny, save_tiny

    model, proc = make_tiny(frame="aux")
    return save_tiny(tmp_path_factory.mktemp("serve") / "run", model, proc)


def test_remote_policy_matches_local_policy(tiny_run):
    from _tiny_vla import obs
    from vla.policies import RemotePolicy, VLAPolicy

    served = VLAPolicy.from_checkpoint(tiny_run, n_action_steps=4, seed=3)
    local = VLAPolicy.from_checkpoint(tiny_run, n_action_steps=4, seed=3)
    rng = np.random.default_rng(0)
    observations = [obs(rng) for _ in range(8)]
    with PolicyServer(served, port=0) as server:
        with RemotePolicy("127.0.0.1", server.port) as remote:
            assert remote.n_action_steps == 4 and remote.env_kwargs() == {"cameras": ("corner",), "image_size": 32}
            assert remote.metadata["has_frame_head"] and remote.metadata["model_config"]["horizon"] == 8
            got_remote = np.stack([remote.act(o, "open the drawer") for o in observations])  # (8, A)
            got_local = np.stack([local.act(o, "open the drawer") for o in observations])
            np.testing.assert_allclose(got_remote, got_local, rtol=1e-5, atol=1e-6)
            assert remote.current_plan() == local.current_plan()
            # one chunk with an explicit noise seed: actions, plan and predicted frame all agree
            c_remote = remote.predict_chunks([observations[0]], ["go"], noise_seed=11, decode_plan=True)[0]
            c_local = local.predict_chunks([observations[0]], ["go"], noise_seed=11, decode_plan=True)[0]
            np.testing.assert_allclose(c_remote.actions, c_local.actions, rtol=1e-5, atol=1e-6)
            assert c_remote.plan == c_local.plan and c_remote.frame.shape == (16, 16, 3)
            np.testing.assert_array_equal(c_remote.frame, c_local.frame)
            # two env slots = two connections with separate plan state on the server
            a = remote.act_batch(observations[:2], ["go", "go"])
            assert a.shape == (2, 4) and len(remote._clients) == 2
            # a wrong request to the real model: a clear error, and the server goes on
            bad = {"images": {"corner": np.zeros((32, 32, 3), np.uint8)}, "state": np.zeros(5, np.float32)}
            with pytest.raises(ValueError, match=r"state'\]: expected float32\[4\]"):
                remote.predict_chunk(bad, "go")
            assert remote.predict_chunk(observations[1], "go").actions.shape == (8, 4)


def test_vla_serve_command(tiny_run):
    import os
    import subprocess
    import sys

    from vla.commands import serve

    with pytest.raises(ValueError, match="checkpoint"):
        serve.main([])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vla", "serve", f"checkpoint={tiny_run}", "port=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving ") and "ws://127.0.0.1:" in line, (line, proc.stderr.read() if
                                                                            proc.poll() is not None else "")
        port = int(line.split("ws://127.0.0.1:")[1].split()[0])
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).read().strip() == b"ok"
        client = PolicyClient("127.0.0.1", port)
        assert client.metadata["state_dim"] == 4
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_server_serves_concurrent_clients():
    import threading

    errors: list[str] = []

    def worker(port: int, k: int) -> None:
        client = PolicyClient("127.0.0.1", port)
        try:
            for j in range(15):
                state = np.full(4, 10 * k + j, np.float32)
                req = _request(observation={"images": {"corner": np.zeros((8, 8, 3), np.uint8)}, "state": state})
                if not np.array_equal(client.infer(req)["actions"][0], state):
                    errors.append(f"client {k} request {j}: wrong reply")
        finally:
            client.close()

    with PolicyServer(EchoPolicy(), port=0) as server:
        threads = [threading.Thread(target=worker, args=(server.port, k)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors


# ---- dynamic batching, API key, non-loopback binds --------------------------------------------------
class RecordingEcho(EchoPolicy):
    """EchoPolicy that records the size of every model call."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def predict_chunks(self, obs_list, *args, **kwargs):
        self.calls.append(len(obs_list))
        return super().predict_chunks(obs_list, *args, **kwargs)


def _concurrent(port: int, n: int, api_key: str | None = None) -> dict[int, dict]:
    import threading

    replies: dict[int, dict] = {}
    clients = [PolicyClient("127.0.0.1", port, api_key=api_key) for _ in range(n)]

    def one(k: int) -> None:
        state = np.full(4, k, np.float32)
        replies[k] = clients[k].infer(_request(observation={"images": {"corner": np.zeros((8, 8, 3), np.uint8)},
                                                            "state": state}))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for c in clients:
        c.close()
    return replies


def test_batching_answers_each_client_from_one_model_call():
    policy = RecordingEcho()
    # a long wait and max_batch = the number of clients: the batch closes when all 6 have arrived
    with PolicyServer(policy, port=0, max_batch=6, batch_wait_ms=20_000) as server:
        replies = _concurrent(server.port, 6)
    assert policy.calls == [6]
    for k, reply in replies.items():  # every client gets its own row back
        assert np.array_equal(reply["actions"], np.full((3, 4), k, np.float32))
        assert reply["timing"]["batch_size"] == 6
    # a lone client is answered at once, not after batch_wait_ms (its recv would time out after 5 s)
    with PolicyServer(RecordingEcho(), port=0, batch_wait_ms=600_000) as server:
        lone = PolicyClient("127.0.0.1", server.port, timeout=5)
        assert lone.infer(_request())["timing"]["batch_size"] == 1
        lone.close()
    serial = RecordingEcho()
    with PolicyServer(serial, port=0, batching=False) as server:
        replies_serial = _concurrent(server.port, 6)
    assert serial.calls == [1] * 6
    assert all(np.array_equal(replies[k]["actions"], replies_serial[k]["actions"]) for k in range(6))


def test_batching_keeps_seeded_requests_alone_and_isolates_a_failing_request():
    class FailsOnNegative(RecordingEcho):
        def predict_chunks(self, obs_list, *args, **kwargs):
            if any(o["state"][0] < 0 for o in obs_list):
                self.calls.append(-len(obs_list))
                raise ValueError("negative state")
            return super().predict_chunks(obs_list, *args, **kwargs)

    policy = FailsOnNegative()
    server = PolicyServer(policy, port=0)
    from vla.serving.server import _Job

    obs = {"images": {"corner": np.zeros((8, 8, 3), np.uint8)}}
    cases = [(1, {}), (-1, {}), (2, {}), (3, {"noise_seed": 7}), (4, {"noise_seed": 8})]
    jobs = [_Job(k, {"observation": {**obs, "state": np.full(4, s, np.float32)}, "instruction": "go", **extra})
            for k, (s, extra) in enumerate(cases)]
    server._run_jobs(jobs)
    # one failing batch of 3 (seeded requests apart), then each of the 3 alone; the seeded two alone
    assert policy.calls == [-3, 1, -1, 1, 1, 1]
    assert [j.error for j in jobs] == [None, "negative state", None, None, None]
    assert [int(j.chunk.actions[0, 0]) for j in jobs if j.chunk is not None] == [1, 2, 3, 4]


def test_batched_actions_equal_unbatched_within_tolerance(tmp_path):
    """The model gives a request the same actions in a batch as alone (same noise row)."""
    from _tiny_vla import make_tiny, obs, save_tiny
    from vla.policies import VLAPolicy

    run = save_tiny(tmp_path / "run", *make_tiny())  # no frame head: the noise rows line up
    policy = VLAPolicy.from_checkpoint(run)
    rng = np.random.default_rng(0)
    observations = [obs(rng) for _ in range(4)]
    batched = policy.predict_chunks(observations, ["open the drawer"] * 4, env_indices=[0, 1, 2, 3], noise_seed=3)
    alone = policy.predict_chunks(observations[:1], ["open the drawer"], env_indices=[9], noise_seed=3)
    np.testing.assert_allclose(batched[0].actions, alone[0].actions, rtol=1e-4, atol=1e-5)
    assert batched[0].plan == alone[0].plan


def test_api_key_wrong_missing_right(tmp_path):
    from vla.serving import read_api_key

    key_file = tmp_path / "key.txt"
    key_file.write_text("k3y-123\n")
    key = read_api_key(str(key_file))
    assert key == "k3y-123"
    with PolicyServer(EchoPolicy(), port=0, api_key=key) as server:
        for wrong in (None, "nope"):
            with pytest.raises(ValueError, match=r"refused the connection: HTTP 401 \(missing or wrong API key\)"):
                PolicyClient("127.0.0.1", server.port, timeout=5, api_key=wrong)
        # the health check stays open (load balancers carry no key)
        assert urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5).read().strip() == b"ok"
        assert _concurrent(server.port, 2, api_key=key)[1]["actions"].shape == (3, 4)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty.txt must hold one key"):
        read_api_key(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="is not a file"):
        read_api_key(str(tmp_path / "missing.txt"))


def test_non_loopback_bind_needs_a_key_or_explicit_permission(tiny_run):
    from vla.commands import serve
    from vla.serving import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("robot.local")
    with pytest.raises(ValueError, match="host=0.0.0.0 accepts connections.*api_key_file=PATH.*allow_no_auth=true"):
        PolicyServer(EchoPolicy(), host="0.0.0.0", port=0)
    with pytest.raises(ValueError, match="host=0.0.0.0 accepts connections"):
        serve.main([f"checkpoint={tiny_run}", "host=0.0.0.0", "port=0"])
    PolicyServer(EchoPolicy(), host="0.0.0.0", port=0, allow_no_auth=True)  # constructed, not bound
    PolicyServer(EchoPolicy(), host="0.0.0.0", port=0, api_key="k")


def test_bench_serve_reports_both_modes(capsys):
    import json

    from vla.bench import serve as bench_serve

    assert bench_serve.main(["clients=3", "requests=2", "warmup=0", "image_size=32", "num_flow_steps=2",
                             "batch_wait_ms=20000", "max_batch=3"]) == 0
    report = json.loads(capsys.readouterr().out)
    serial, batched = report["modes"]["serial"], report["modes"]["batched"]
    assert serial["requests"] == batched["requests"] == 6
    assert serial["mean_batch_size"] == 1.0 and batched["mean_batch_size"] == 3.0  # all 3 clients in each call
    assert serial["latency_ms_p99"] >= serial["latency_ms_p50"] > 0
    assert report["speedup"] == round(batched["requests_per_s"] / serial["requests_per_s"], 2)
    calls = report["model_calls"]  # the model alone at batch 1 and at max_batch, and what batching can gain at most
    assert calls["batch_1_ms"] > 0 and calls["batch_3_ms"] > 0
    assert calls["batching_ceiling"] == round(3 * calls["batch_1_ms"] / calls["batch_3_ms"], 2)
    with pytest.raises(ValueError, match="modes must be a list of serial, batched"):
        bench_serve.main(["modes=[fast]"])
