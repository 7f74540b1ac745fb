"""`vla serve`: serve a trained policy over websocket + msgpack (openpi's wire style).

    vla serve checkpoint=RUN_DIR port=8000 [host=127.0.0.1]
    vla serve checkpoint=RUN_DIR protocol=openpi           # openpi clients, unmodified
    vla serve checkpoint=RUN_DIR host=0.0.0.0 api_key_file=key.txt

Clients (``vla.policies.RemotePolicy``, or any websocket client speaking the protocol in
:mod:`vla.serving`) get the model's metadata on connect, then one action chunk per request.
Concurrent requests are batched into one model call (``batching=false`` serves them one at a
time). ``GET /healthz`` answers ``ok``. Stop with Ctrl-C.
"""

from __future__ import annotations

import logging

from omegaconf import OmegaConf


def main(argv: list[str]) -> int:
    from vla.config import compose

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print(OmegaConf.to_yaml(compose("serve", [])))
        return 0
    cfg = compose("serve", argv)
    pcfg = OmegaConf.to_container(cfg.policy, resolve=True)
    if pcfg["name"] != "vla":
        raise ValueError(f"vla serve serves a checkpoint: expected policy=vla, got policy={pcfg['name']}")
    if not pcfg.get("checkpoint"):
        raise ValueError("vla serve needs checkpoint=PATH (a run dir, its checkpoints dir or a step folder)")
    if not 0 <= int(cfg.port) < 65536:
        raise ValueError(f"port: expected 0..65535, got {cfg.port}")
    if float(cfg.max_message_mb) <= 0:
        raise ValueError(f"max_message_mb: expected > 0, got {cfg.max_message_mb}")
    from vla.serving import read_api_key

    api_key = read_api_key(cfg.api_key_file) if cfg.get("api_key_file") else None
    from vla.policies import make_policy
    from vla.serving import PolicyServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    policy = make_policy(pcfg)
    server = PolicyServer(policy, host=cfg.host, port=int(cfg.port),
                          max_message_bytes=int(float(cfg.max_message_mb) * 1024 * 1024),
                          protocol=str(cfg.protocol), openpi=OmegaConf.to_container(cfg.openpi, resolve=True),
                          api_key=api_key, allow_no_auth=bool(cfg.allow_no_auth), batching=bool(cfg.batching),
                          max_batch=int(cfg.max_batch), batch_wait_ms=float(cfg.batch_wait_ms))
    try:
        server.start()
    except OSError as e:
        raise ValueError(f"cannot listen on {cfg.host}:{cfg.port}: {e}") from None
    meta = server.metadata
    auth = ", API key required" if api_key else ""
    print(f"serving {pcfg['checkpoint']} ({cfg.protocol} protocol{auth}) on ws://{cfg.host}:{server.port} "
          f"(health: http://{cfg.host}:{server.port}/healthz)")
    print(f"cameras {meta['cameras']}, state_dim {meta['state_dim']}, action_dim {meta['action_dim']}, "
          f"horizon {meta['horizon']}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0

