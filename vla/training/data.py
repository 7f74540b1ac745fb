"""Training data set-up: open the episode store, pick the train/validation episodes, and fill the
data-dependent model fields (cameras, image size, state/action dims) from the store. Every check
here runs before training step 1, and each error names the config key and the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys of the composed `model` group that describe the preset rather than VLAConfig fields.
MODEL_META_KEYS = ("preset", "name")


def open_store(dcfg: DictConfig):
    """Open the episode store named by ``dataset.path`` or raise a ValueError naming it."""
    from vla.datasets import EpisodeStore, StoreError

    path = dcfg.get("path")
    if path is None or OmegaConf.is_missing(dcfg, "path"):
        raise ValueError("dataset.path is required: the Zarr store written by `vla collect`")
    p = Path(str(path))
    if not p.exists():
        raise ValueError(f"dataset.path: store not found: {p}")
    from vla.training.chunk_loader import choose_source, image_bytes

    try:
        store = EpisodeStore(str(p), in_memory=False)  # reads the index only
        in_memory, why = choose_source(dcfg.get("in_memory", "auto"), image_bytes(store))
        note = f"data: {'memory' if in_memory else 'disk (chunk-local order, a shuffle buffer of chunks)'}; {why}"
        if in_memory:
            try:
                store = EpisodeStore(str(p), in_memory=True)
            except StoreError as e:
                # With on_corrupt=skip a corrupt image chunk must not stop the run at open: read images
                # from disk instead, where the sampler skips the episodes that cannot be read.
                if not (str(dcfg.get("on_corrupt", "stop")) == "skip" and "is corrupt" in str(e)):
                    raise
                note = f"data: disk (chunk-local order); images read from disk: loading them into memory met {e}"
        store.open_note = note
    except ValueError as e:
        raise ValueError(f"dataset.path: cannot open store {p}: {e}") from None
    except Exception as e:  # noqa: BLE001 - zarr/OS errors of a corrupt store become one clear line
        raise ValueError(f"dataset.path: {p} is not a valid vla episode store ({type(e).__name__}: {e})") from None
    if store.num_episodes == 0:
        raise ValueError(f"dataset.path: store {p} has no episodes")
    return store


def select_episodes(store, dcfg: DictConfig) -> tuple[list[int], list[int]]:
    """(train, val) episode indices after the task filter and the validation hold-out."""
    tasks = list(dcfg.get("tasks") or [])
    all_tasks = list(store.episode_tasks)
    eps = [i for i, t in enumerate(all_tasks) if not tasks or t in tasks]
    if not eps:
        raise ValueError(
            f"dataset.tasks={tasks}: no episodes of these tasks in {dcfg.path} "
            f"(the store has tasks {sorted(set(all_tasks))})"
        )
    n_val = int(dcfg.get("val_episodes") or 0)
    if n_val < 0 or n_val >= len(eps):
        raise ValueError(f"dataset.val_episodes={n_val}: must be in [0, {len(eps) - 1}] for {len(eps)} episodes")
    return (eps[: len(eps) - n_val], eps[len(eps) - n_val :]) if n_val else (eps, [])


def build_model_config(mcfg: dict[str, Any], store, dcfg: DictConfig):
    """``VLAConfig`` from the composed ``model`` group with cameras, image size and dims from the store.

    ``dataset.cameras`` (if set) picks the cameras and ``dataset.frame_camera`` the future-frame camera.
    """
    from vla.model import VLAConfig

    d = {k: v for k, v in mcfg.items() if k not in MODEL_META_KEYS}
    if dcfg.get("cameras"):
        d["cameras"] = list(dcfg.cameras)
    if dcfg.get("frame_camera"):
        d["frame_camera"] = str(dcfg.frame_camera)
    try:
        return VLAConfig.from_store(d, store)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model config (with dims from {dcfg.path}): {e}") from None


def store_camera_projection(store, camera: str, image_hw: tuple[int, int]):
    """The 3x4 projection (world xyz -> pixel column, row) of ``camera`` at ``image_hw`` in the env the
    store was collected in, as its images show it (one env made and reset; `goal_patch_loss_weight`).
    The camera must be fixed in the world: a camera that moves with the hand has no one projection."""
    import mujoco

    from vla.envs.registry import make_env
    from vla.envs.rendering import CameraRenderer, camera_projection

    env = make_env(store.env, store.episode_tasks[0], cameras=[camera], image_size=tuple(image_hw),
                   **store.env_options)
    try:
        env.reset(seed=0)
        model, data = env.unwrapped.model, env.unwrapped.data
        cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if cam < 0 or model.cam_bodyid[cam] != 0:
            where = "does not exist" if cam < 0 else f"is attached to body {model.body(model.cam_bodyid[cam]).name!r}"
            raise ValueError(f"model.goal_patch_loss_weight needs the first camera (model.cameras[0] = {camera!r}) "
                             f"fixed in the world of env {store.env!r}; it {where}")
        rotated = CameraRenderer._is_upside_down(data, cam)
        return camera_projection(model, data, camera, image_hw, rotated=rotated)
    finally:
        env.close()
