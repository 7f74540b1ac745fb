"""`vla serve protocol=openpi` against the real openpi client from PyPI (openpi-client 0.1.2,
installed by scripts/setup.sh without its numpy<2 pin), not against a copy of its code."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

openpi_client = pytest.importorskip("openpi_client", reason="scripts/setup.sh installs openpi-client==0.1.2")
from openpi_client import msgpack_numpy  # noqa: E402
from openpi_client.websocket_client_policy import WebsocketClientPolicy  # noqa: E402

from vla.serving import PolicyServer, pack, unpack  # noqa: E402
from vla.serving.openpi import OpenpiMapping, resize_image  # noqa: E402


def test_codec_reads_and_writes_openpi_style():
    msg = {"img": np.arange(24, dtype=np.uint8).reshape(2, 4, 3), "s": np.float32(2.5), "i": np.int32(-3),
           "nested": {"state": np.ones(3, np.float32)}, "prompt": "go"}
    ours = unpack(msgpack_numpy.packb(msg))  # openpi -> us: bytes-keyed arrays and numpy scalars
    assert ours["img"].dtype == np.uint8 and np.array_equal(ours["img"], msg["img"])
    assert ours["s"] == 2.5 and ours["s"].dtype == np.float32 and ours["i"] == -3 and ours["i"].dtype == np.int32
    assert np.array_equal(ours["nested"]["state"], msg["nested"]["state"]) and ours["prompt"] == "go"
    theirs = msgpack_numpy.unpackb(pack(msg, "openpi"))  # us -> openpi
    assert np.array_equal(theirs["img"], msg["img"]) and theirs["nested"]["state"].dtype == np.float32
    plain = msgpack_numpy.unpackb(pack(msg))  # our own style is not what openpi reads: the reason for the mode
    assert isinstance(plain["img"], dict)


def test_mapping_errors_name_the_key():
    cams = {"corner": (8, 8)}
    m = OpenpiMapping.from_config({"images": {"observation/image": "corner"}}, cams)
    good = {"observation/image": np.zeros((8, 8, 3), np.uint8), "observation/state": np.zeros(4), "prompt": "go"}
    req = m.to_request(good, cams, 4)
    assert req["instruction"] == "go" and req["observation"]["state"].dtype == np.float32
    with pytest.raises(ValueError, match=r"missing keys \['observation/image'\]"):
        m.to_request({"observation/state": np.zeros(4), "prompt": "go"}, cams, 4)
    with pytest.raises(ValueError, match=r"state keys \{'observation/state': 5\} add up to 5 values.*state_dim=4"):
        m.to_request({**good, "observation/state": np.zeros(5)}, cams, 4)
    with pytest.raises(ValueError, match=r"\['prompt'\]: expected a non-empty string"):
        m.to_request({k: v for k, v in good.items() if k != "prompt"}, cams, 4)
    with pytest.raises(ValueError, match=r"\['observation/image'\]: expected uint8\[H, W, 3\], got float32"):
        m.to_request({**good, "observation/image": np.zeros((8, 8, 3), np.float32)}, cams, 4)
    with pytest.raises(ValueError, match=r"missing \['corner'\], unknown \['wrist'\]"):
        OpenpiMapping.from_config({"images": {"observation/image": "wrist"}}, cams)
    strict = OpenpiMapping.from_config({"resize": False}, cams)
    with pytest.raises(ValueError, match=r"uint8\[8, 8, 3\], got uint8\[16, 16, 3\].*openpi.resize=true"):
        strict.to_request({"observation/corner": np.zeros((16, 16, 3), np.uint8), "observation/state": np.zeros(4),
                           "prompt": "go"}, cams, 4)
    # DROID-style state from two keys, concatenated in order
    droid = OpenpiMapping.from_config({"state": ["observation/joint_position", "observation/gripper_position"]}, cams)
    r = droid.to_request({"observation/corner": np.zeros((8, 8, 3), np.uint8), "prompt": "go",
                          "observation/joint_position": np.arange(3.0),
                          "observation/gripper_position": np.array([7.0])}, cams, 4)
    assert r["observation"]["state"].tolist() == [0.0, 1.0, 2.0, 7.0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from _tiny_vla import make_tiny, save_tiny

    model, proc = make_tiny()
    return save_tiny(tmp_path_factory.mktemp("openpi") / "run", model, proc)


def _libero_obs(rng, size=224):
    """What openpi's LIBERO example sends: flat keys, 224 x 224 images, the state and a prompt."""
    return {"observation/image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "observation/state": rng.uniform(-0.5, 0.5, 4).astype(np.float32),
            "prompt": "open the drawer"}


def test_openpi_client_gets_the_local_policys_actions(tiny_run):
    from vla.policies import VLAPolicy

    served = VLAPolicy.from_checkpoint(tiny_run, seed=5)
    local = VLAPolicy.from_checkpoint(tiny_run, seed=5)
    rng = np.random.default_rng(0)
    libero = {"images": {"observation/image": "corner"}, "state": ["observation/state"]}
    with PolicyServer(served, port=0, protocol="openpi", openpi=libero) as server:
        client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        meta = client.get_server_metadata()
        assert meta["wire"] == "openpi" and meta["horizon"] == 8 and meta["cameras"] == {"corner": [32, 32]}
        for _ in range(3):
            obs = _libero_obs(rng)
            out = client.infer(obs)
            assert out["actions"].shape == (8, 4) and out["actions"].dtype == np.float32
            assert out["server_timing"]["infer_ms"] >= 0
            # the same model on the server-side resize of the image: the same actions
            want = local.predict_chunk({"images": {"corner": resize_image(obs["observation/image"], (32, 32))},
                                        "state": obs["observation/state"]}, obs["prompt"]).actions
            np.testing.assert_allclose(out["actions"], want, rtol=1e-5, atol=1e-6)
        assert "prev_total_ms" in out["server_timing"]  # openpi reports the previous round trip
        client._ws.close()


def test_openpi_client_against_vla_serve_command(tiny_run):
    """The command a user runs, the client a user has: flat keys in, actions + server_timing out;
    an invalid request raises in the client (error text, then close code 1011)."""
    import websockets.exceptions

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vla", "serve", f"checkpoint={tiny_run}", "port=0",
                             "protocol=openpi", "openpi.images={observation/image:corner}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "openpi protocol" in line and "ws://127.0.0.1:" in line, (line, proc.poll() is not None
                                                                         and proc.stderr.read())
        port = int(line.split("ws://127.0.0.1:")[1].split()[0])
        client = WebsocketClientPolicy(host="127.0.0.1", port=port)
        out = client.infer(_libero_obs(np.random.default_rng(1)))
        assert out["actions"].shape == (8, 4) and set(out["server_timing"]) >= {"infer_ms"}
        bad = _libero_obs(np.random.default_rng(2))
        bad["observation/state"] = np.zeros(7, np.float32)
        with pytest.raises(RuntimeError, match=r"Error in inference server:\n.*add up to 7 values.*state_dim=4"):
            client.infer(bad)
        with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
            client.infer(_libero_obs(np.random.default_rng(3)))
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011
        # the server goes on serving new clients
        again = WebsocketClientPolicy(host="127.0.0.1", port=port)
        assert again.infer(_libero_obs(np.random.default_rng(4)))["actions"].shape == (8, 4)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_openpi_client_api_key(tiny_run):
    """Wrong and missing keys are refused at the handshake (HTTP 401); the right key is served."""
    import websockets.exceptions
    from vla.policies import VLAPolicy

    from vla.serving import PolicyClient

    with PolicyServer(VLAPolicy.from_checkpoint(tiny_run), port=0, protocol="openpi", api_key="s3cret-key",
                      openpi={"images": {"observation/image": "corner"}}) as server:
        for key in (None, "wrong"):
            with pytest.raises(websockets.exceptions.InvalidStatus) as info:
                WebsocketClientPolicy(host="127.0.0.1", port=server.port, api_key=key)
            assert info.value.response.status_code == 401
        with pytest.raises(ValueError, match="HTTP 401 \\(missing or wrong API key\\)"):
            PolicyClient("127.0.0.1", server.port, timeout=5, api_key="wrong")
        client = WebsocketClientPolicy(host="127.0.0.1", port=server.port, api_key="s3cret-key")
        assert client.infer(_libero_obs(np.random.default_rng(0)))["actions"].shape == (8, 4)
        client._ws.close()
