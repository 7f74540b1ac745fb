"""`vla eval`: closed-loop evaluation of a checkpoint (or of the scripted experts) in simulation.

    vla eval checkpoint=RUN_DIR tasks=[drawer-open-v3] episodes=50 n_envs=4
    vla eval policy=expert env=metaworld tasks=[drawer-open-v3] episodes=20 env.cameras=[corner]

Writes ``eval_info.json``, ``success.png`` and ``videos/*.mp4`` into the run dir and prints a table.
A checkpoint brings its cameras and image size (the env is built to match what the model was
trained on) and, when not given, the env family and tasks it was trained for.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def _store_info(path: str | None) -> tuple[str | None, list[str]]:
    """Env family and tasks of the Zarr store a checkpoint was trained on, if it is still there."""
    if not path:
        return None, []
    from pathlib import Path

    if not Path(path).exists():
        return None, []
    try:
        from vla.datasets import EpisodeStore

        store = EpisodeStore(path)
        return store.env, list(dict.fromkeys(store.episode_tasks))
    except Exception:  # a moved or foreign store only costs us the defaults
        return None, []


def checkpoint_env_and_tasks(train_cfg: dict[str, Any],
                             trained_on: dict[str, Any] | None = None) -> tuple[str | None, list[str]]:
    """The env family and tasks a checkpoint was trained for: train ``eval.*``, ``dataset.tasks``, the
    store's env and tasks as the checkpoint recorded them (``trained_on``), the store itself."""
    ev = train_cfg.get("eval") or {}
    ds = train_cfg.get("dataset") or {}
    trained_on = trained_on or {}
    env = ev.get("env") or trained_on.get("env")
    tasks = list(ev.get("tasks") or []) or list(ds.get("tasks") or []) or list(trained_on.get("tasks") or [])
    if not env or not tasks:
        store_env, store_tasks = _store_info(ds.get("path"))
        env = env or store_env
        tasks = tasks or store_tasks
    return env, tasks


def build_policy(cfg: Any) -> tuple[Any, str, list[str], dict[str, Any]]:
    """(policy, env family, tasks, make_env kwargs) from an eval/plan config."""
    raw_tasks = cfg.get("tasks") or []
    tasks = [str(raw_tasks)] if isinstance(raw_tasks, str) else [str(t) for t in raw_tasks]  # tasks=one-task ok
    env_group = cfg.get("env")  # configs/env/<family>.yaml, or None
    env = str(env_group.family) if env_group else None
    env_kwargs: dict[str, Any] = {}
    if env_group and env_group.get("max_episode_steps"):
        env_kwargs["max_episode_steps"] = int(env_group.max_episode_steps)
    from vla.envs.registry import ENV_OPTIONS

    # env.layout=... (any ENV_OPTIONS key given on the command line) beats the checkpoint's store
    given = {k: env_group[k] for k in ENV_OPTIONS if env_group and env_group.get(k) is not None}

    from vla.policies import make_policy

    pcfg = OmegaConf.to_container(cfg.policy, resolve=True)
    if pcfg["name"] == "expert":
        if not env or not tasks:
            raise ValueError("policy=expert needs env=FAMILY and tasks=[...] (no checkpoint to take them from)")
        if env_group.get("cameras"):
            env_kwargs["cameras"] = tuple(env_group.cameras)
        if env_group.get("image_size"):
            env_kwargs["image_size"] = int(env_group.image_size)
        return make_policy(pcfg, family=env), env, tasks, {**env_kwargs, **given}
    policy = make_policy(pcfg, family=env)
    if pcfg["name"] == "remote":
        if not env or not tasks:
            raise ValueError("policy=remote needs env=FAMILY and tasks=[...] (the server does not say them)")
        return policy, env, tasks, {**env_kwargs, **policy.env_kwargs(), **given}
    ck_env, ck_tasks = checkpoint_env_and_tasks(policy.train_config, getattr(policy, "trained_on", None))
    env = env or ck_env
    tasks = tasks or ck_tasks
    if not env or not tasks:
        raise ValueError(
            f"checkpoint {pcfg['checkpoint']} does not say which env/tasks it was trained on; "
            "pass env=FAMILY tasks=[...]"
        )
    return policy, env, tasks, {**env_kwargs, **policy.env_kwargs(), **given}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        from vla.config import compose

        print(__doc__)
        print(OmegaConf.to_yaml(compose("eval", [])))
        return 0
    from vla.config import compose, make_run_dir
    from vla.evaluation import format_table, run_evaluation, write_outputs

    cfg = compose("eval", argv)
    policy, env, tasks, env_kwargs = build_policy(cfg)
    run_dir = make_run_dir(cfg, "eval")
    try:
        result = run_evaluation(
            policy,
            env,
            tasks,
            episodes_per_task=int(cfg.episodes),
            n_envs=int(cfg.n_envs),
            seed_start=cfg.seed_start,
            instruction_split=cfg.instruction_split,
            max_steps=cfg.max_episode_steps,
            video_dir=run_dir / "videos" if int(cfg.videos) > 0 else None,
            videos_per_task=int(cfg.videos),
            env_kwargs=env_kwargs,
            video_fps=int(cfg.video_fps),
            progress=bool(cfg.progress),
            torch_threads=cfg.torch_threads,
            instruction=cfg.get("instruction"),
            sync_chunks=bool(cfg.get("sync_chunks", True)),
        )
    finally:
        policy.close()
    result["checkpoint"] = cfg.policy.get("checkpoint") and str(cfg.policy.checkpoint)
    title = f"{cfg.policy.name} on {env}, seeds {result['seed_start']}..{result['seed_end']}"
    paths = write_outputs(result, run_dir, chart_title=title)
    print(format_table(result))
    tp = result["throughput"]
    print(f"{tp['env_steps']} env steps in {tp['wall_s']:.1f} s "
          f"({tp['env_steps_per_s']:.1f} steps/s, n_envs={cfg.n_envs})")
    print(f"eval_info: {paths['eval_info']}\nchart:     {paths['chart']}")
    for v in result["videos"]:
        print(f"video:     {v}")
    return 0
