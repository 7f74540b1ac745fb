"""LeRobotDataset v3 folders in and out: ``import_lerobot`` (v3 -> our store) and
``export_lerobot`` (our store -> v3).

The v3 layout (LeRobot 0.4)::

    meta/info.json                            codebase_version "v3.0", fps, features, path templates
    meta/stats.json                           {feature: {min, max, mean, std, count, q01, q99}}
    meta/tasks.parquet                        task_index, indexed by the task string
    meta/episodes/chunk-000/file-000.parquet  one row per episode: length, tasks, row range, files
    data/chunk-000/file-000.parquet           one row per frame: action, observation.state,
                                              timestamp, frame_index, episode_index, index,
                                              task_index (+ images as PNG structs when "image")
    videos/<key>/chunk-000/file-000.mp4       camera streams when "video"

Mapping: ``observation.images.<cam>`` <-> camera ``<cam>``; ``observation.state`` <-> state;
``action`` <-> action; a LeRobot task (a language string) <-> our episode instruction;
``next.reward`` / ``next.success`` <-> reward / success. What v3 has no place for (our task
name, seed and per-step subtask labels, the env name) travels in extra columns (``vla/task``,
``vla/seed`` in the episodes table, ``vla.subtask_index`` per frame) and an extra ``vla`` key
of info.json; LeRobot ignores them, and a foreign dataset without them imports with the
instruction as task and sole subtask and the episode index as seed.

Images: ``images="png"`` embeds lossless PNGs in the data files (the round trip store -> v3 ->
store is exact); ``"mp4"`` writes one H.264 video per camera (lossy; see ``vla.datasets.video``).
Data files roll over at ``data_files_size_in_mb``; every file holds whole episodes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from vla.datasets.layout import StoreError

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000
DATA_FILE_MB = 100
VIDEO_FILE_MB = 200
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
IMAGE_PREFIX = "observation.images."
SUBTASK_KEY = "vla.subtask_index"


def _png_encode(img: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img[..., ::-1]))  # cv2 wants BGR
    if not ok:
        raise StoreError(f"PNG encoding failed for an image of shape {img.shape}")
    return buf.tobytes()


def _png_decode(data: bytes, where: str) -> np.ndarray:
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise StoreError(f"{where}: image bytes are not a decodable PNG/JPEG")
    return img[..., ::-1]  # (H, W, 3) RGB


# -- export ----------------------------------------------------------------------------------


def export_lerobot(store: str | os.PathLike, out: str | os.PathLike, images: str = "png") -> dict[str, Any]:
    """Write the committed episodes of ``store`` as a LeRobotDataset v3 folder ``out`` (must not
    exist or be empty). Returns the info.json written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from vla.datasets.store import EpisodeStore
    from vla.datasets.video import encode_video

    if images not in ("png", "mp4"):
        raise StoreError(f"export_lerobot: images must be 'png' or 'mp4', got {images!r}")
    s = EpisodeStore(store)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise StoreError(f"{out} exists and is not empty; export_lerobot writes a new folder")
    if images == "mp4" and any(h % 2 or w % 2 for h, w in s.cameras.values()):
        raise StoreError(f"export_lerobot: mp4 needs even image sizes, cameras are {s.cameras}; use images='png'")
    fps = s.fps
    tasks = sorted(set(s.episode_instructions))
    task_index = {t: i for i, t in enumerate(tasks)}
    a_dim, s_dim = s.action_dim, s.state_dim
    features: dict[str, Any] = {
        "action": {"dtype": "float32", "shape": [a_dim], "names": s.action_names},
        "observation.state": {"dtype": "float32", "shape": [s_dim], "names": s.state_names},
    }
    for cam, (h, w) in s.cameras.items():
        feat = {"dtype": "image" if images == "png" else "video", "shape": [h, w, 3],
                "names": ["height", "width", "channels"]}
        if images == "mp4":
            feat["info"] = {"video.height": h, "video.width": w, "video.codec": "h264", "video.pix_fmt": "yuv420p",
                            "video.is_depth_map": False, "video.fps": fps, "video.channels": 3, "has_audio": False}
        features[IMAGE_PREFIX + cam] = feat
    if "reward" in s.optional_keys:
        features["next.reward"] = {"dtype": "float32", "shape": [1], "names": None}
    if "success" in s.optional_keys:
        features["next.success"] = {"dtype": "bool", "shape": [1], "names": None}
    features[SUBTASK_KEY] = {"dtype": "int64", "shape": [1], "names": None}
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        features[key] = {"dtype": "float32" if key == "timestamp" else "int64", "shape": [1], "names": None}

    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [("action", pa.list_(pa.float32(), a_dim)), ("observation.state", pa.list_(pa.float32(), s_dim))]
    if images == "png":
        fields += [(IMAGE_PREFIX + cam, img_type) for cam in s.cameras]
    if "reward" in s.optional_keys:
        fields.append(("next.reward", pa.float32()))
    if "success" in s.optional_keys:
        fields.append(("next.success", pa.bool_()))
    fields += [(SUBTASK_KEY, pa.int64()), ("timestamp", pa.float32()), ("frame_index", pa.int64()),
               ("episode_index", pa.int64()), ("index", pa.int64()), ("task_index", pa.int64())]
    schema = pa.schema(fields)

    out.mkdir(parents=True, exist_ok=True)
    episodes: list[dict[str, Any]] = []
    writer, file_index, file_bytes = None, 0, 0
    starts, ends = s.episode_starts, s.episode_ends
    lowdim = {k: s.lowdim(k) for k in ("action", "state", "subtask") + s.optional_keys}
    try:
        for i in range(s.num_episodes):
            lo, hi = int(starts[i]), int(ends[i])
            t = hi - lo
            if writer is not None and file_bytes > DATA_FILE_MB * 2**20:
                writer.close()
                writer, file_index, file_bytes = None, file_index + 1, 0
            if writer is None:
                f = out / DATA_PATH.format(chunk_index=file_index // CHUNKS_SIZE, file_index=file_index)
                f.parent.mkdir(parents=True, exist_ok=True)
                writer = pq.ParquetWriter(str(f), schema)
            cols: dict[str, Any] = {
                "action": pa.FixedSizeListArray.from_arrays(pa.array(lowdim["action"][lo:hi].reshape(-1)), a_dim),
                "observation.state": pa.FixedSizeListArray.from_arrays(
                    pa.array(lowdim["state"][lo:hi].reshape(-1)), s_dim),
            }
            if images == "png":
                for cam in s.cameras:
                    frames = s.read_frames(cam, np.arange(lo, hi))  # (T, H, W, 3)
                    pngs = [_png_encode(fr) for fr in frames]
                    file_bytes += sum(len(p) for p in pngs)
                    cols[IMAGE_PREFIX + cam] = pa.array([{"bytes": p, "path": None} for p in pngs], img_type)
            if "reward" in s.optional_keys:
                cols["next.reward"] = pa.array(lowdim["reward"][lo:hi], pa.float32())
            if "success" in s.optional_keys:
                cols["next.success"] = pa.array(lowdim["success"][lo:hi], pa.bool_())
            frame = np.arange(t, dtype=np.int64)
            cols[SUBTASK_KEY] = pa.array(lowdim["subtask"][lo:hi].astype(np.int64))
            cols["timestamp"] = pa.array((frame / fps).astype(np.float32))
            cols["frame_index"] = pa.array(frame)
            cols["episode_index"] = pa.array(np.full(t, i, np.int64))
            cols["index"] = pa.array(np.arange(lo, hi, dtype=np.int64))
            instr = s.episode_instructions[i]
            cols["task_index"] = pa.array(np.full(t, task_index[instr], np.int64))
            writer.write_table(pa.table(cols, schema=schema))
            file_bytes += t * (a_dim + s_dim) * 4
            ep = {"episode_index": i, "tasks": [instr], "length": t,
                  "data/chunk_index": file_index // CHUNKS_SIZE, "data/file_index": file_index,
                  "dataset_from_index": lo, "dataset_to_index": hi,
                  "vla/task": s.episode_tasks[i], "vla/seed": int(s.episode_seeds[i])}
            for key, x in (("action", lowdim["action"][lo:hi]), ("observation.state", lowdim["state"][lo:hi])):
                for stat, v in _stats(x).items():
                    ep[f"stats/{key}/{stat}"] = v
            episodes.append(ep)
    finally:
        if writer is not None:
            writer.close()

    if images == "mp4":  # one video per camera (the whole store), episodes located by timestamps
        for cam in s.cameras:
            key = IMAGE_PREFIX + cam
            frames = s.read_frames(cam, np.arange(s.num_steps))  # (N, H, W, 3)
            encode_video(frames, out / VIDEO_PATH.format(video_key=key, chunk_index=0, file_index=0), fps)
            for ep in episodes:
                ep.update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": 0,
                           f"videos/{key}/from_timestamp": ep["dataset_from_index"] / fps,
                           f"videos/{key}/to_timestamp": ep["dataset_to_index"] / fps})
    for ep in episodes:
        ep["meta/episodes/chunk_index"], ep["meta/episodes/file_index"] = 0, 0
    ep_file = out / EPISODES_PATH.format(chunk_index=0, file_index=0)
    ep_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episodes), str(ep_file))
    _write_tasks(out / "meta/tasks.parquet", tasks)

    stats = {"action": _stats(lowdim["action"]), "observation.state": _stats(lowdim["state"])}
    for cam in s.cameras:
        stats[IMAGE_PREFIX + cam] = _image_stats(s, cam)
    (out / "meta/stats.json").write_text(json.dumps(stats, indent=1))
    attrs = s.attrs
    info = {
        "codebase_version": CODEBASE_VERSION, "robot_type": s.env, "total_episodes": s.num_episodes,
        "total_frames": s.num_steps, "total_tasks": len(tasks), "chunks_size": CHUNKS_SIZE,
        "data_files_size_in_mb": DATA_FILE_MB, "video_files_size_in_mb": VIDEO_FILE_MB, "fps": fps,
        "splits": {"train": f"0:{s.num_episodes}"}, "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if images == "mp4" else None, "features": features,
        "vla": {"env": s.env, "subtasks": s.subtask_table, "image_chunk_frames": attrs.get("image_chunk_frames"),
                "compression": attrs.get("compression"), "vla_version": attrs.get("vla_version")},
    }
    (out / "meta/info.json").write_text(json.dumps(info, indent=1))
    return info


def _stats(x: np.ndarray) -> dict[str, Any]:
    x = np.asarray(x, np.float64)  # (T, D)
    return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
            "std": x.std(0).tolist(), "count": [int(x.shape[0])],
            "q01": np.quantile(x, 0.01, axis=0).tolist(), "q99": np.quantile(x, 0.99, axis=0).tolist()}


def _image_stats(s, cam: str) -> dict[str, Any]:
    """Per-channel statistics in [0, 1], shaped (3, 1, 1) as LeRobot keeps them."""
    total, sq, n = np.zeros(3), np.zeros(3), 0
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for start in range(0, s.num_steps, 256):
        fr = s.read_frames(cam, np.arange(start, min(start + 256, s.num_steps))).astype(np.float64) / 255.0
        flat = fr.reshape(-1, 3)  # (T*H*W, 3)
        total += flat.sum(0)
        sq += (flat**2).sum(0)
        n += flat.shape[0]
        lo, hi = np.minimum(lo, flat.min(0)), np.maximum(hi, flat.max(0))
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 0.0))

    def c(v):
        return [[[float(x)]] for x in v]

    return {"min": c(lo), "max": c(hi), "mean": c(mean), "std": c(std), "count": [s.num_steps]}


def _write_tasks(path: Path, tasks: list[str]) -> None:
    """tasks.parquet as pandas writes a DataFrame indexed by the task string (LeRobot reads it
    with pandas and takes a task's text from the index), without needing pandas here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pandas_meta = {
        "index_columns": ["task"], "column_indexes": [],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
             "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.0",
    }
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    table = table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
    pq.write_table(table, str(path))


# -- import ----------------------------------------------------------------------------------


def import_lerobot(src: str | os.PathLike, out: str | os.PathLike, env: str | None = None):
    """Read a local LeRobotDataset v3 folder into a new store at ``out``; returns the ``EpisodeStore``."""
    import pyarrow.parquet as pq
    from vla.datasets.store import EpisodeStore
    from vla.datasets.writer import EpisodeWriter

    src = Path(src)
    info_path = src / "meta/info.json"
    if not info_path.is_file():
        raise StoreError(f"{src}: not a LeRobotDataset folder: meta/info.json is missing")
    info = json.loads(info_path.read_text())
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3"):
        raise StoreError(f"{info_path}: codebase_version {version!r}, expected v3.x (LeRobot 0.4 datasets); "
                         "convert older datasets with LeRobot's v2.1 -> v3.0 converter first")
    feats = info.get("features") or {}
    for key in ("action", "observation.state"):
        if key not in feats:
            raise StoreError(f"{info_path}: feature '{key}' is missing; have {sorted(feats)}")
    cams = {k[len(IMAGE_PREFIX):]: k for k, f in feats.items()
            if k.startswith(IMAGE_PREFIX) and f.get("dtype") in ("image", "video")}
    if not cams:
        raise StoreError(f"{info_path}: no camera feature ('{IMAGE_PREFIX}<name>' with dtype image or video); "
                         f"have {sorted(feats)}")
    fps = float(info["fps"])
    extra = info.get("vla") or {}
    tasks = _read_tasks(src / "meta/tasks.parquet")
    ep_files = sorted((src / "meta/episodes").rglob("*.parquet"))
    if not ep_files:
        raise StoreError(f"{src}: meta/episodes/*/*.parquet is missing")
    ep_rows = sorted((r for f in ep_files for r in pq.read_table(str(f)).to_pylist()),
                     key=lambda r: r["episode_index"])
    subtasks = extra.get("subtasks")

    cameras = {c: tuple(int(v) for v in feats[k]["shape"][:2]) for c, k in cams.items()}
    comp = extra.get("compression") or {}
    writer = EpisodeWriter(
        out, env=env or extra.get("env") or info.get("robot_type") or "lerobot", fps=fps, cameras=cameras,
        action_dim=int(feats["action"]["shape"][0]), state_dim=int(feats["observation.state"]["shape"][0]),
        action_names=_names(feats["action"]), state_names=_names(feats["observation.state"]),
        image_chunk_frames=extra.get("image_chunk_frames"), compression_level=comp.get("clevel", 3),
        image_shuffle=comp.get("image_shuffle", "noshuffle"))
    data_cache: dict[Path, Any] = {}
    with writer:
        for ep in ep_rows:
            i = int(ep["episode_index"])
            where = f"{src} episode {i}"
            f = src / info.get("data_path", DATA_PATH).format(chunk_index=int(ep["data/chunk_index"]),
                                                              file_index=int(ep["data/file_index"]))
            if f not in data_cache:
                data_cache.clear()  # files are read in order; keep one in memory
                data_cache[f] = pq.read_table(str(f))
            table = data_cache[f]
            idx = np.asarray(table.column("episode_index").to_numpy())
            rows = np.flatnonzero(idx == i)
            if rows.size != int(ep["length"]):
                raise StoreError(f"{where}: {f.name} holds {rows.size} frames, meta/episodes says {ep['length']}")
            t = table.take(rows)
            frame_order = np.argsort(np.asarray(t.column("frame_index").to_numpy()), kind="stable")
            t = t.take(frame_order)
            action = np.stack(t.column("action").to_numpy(zero_copy_only=False)).astype(np.float32)  # (T, A)
            state = np.stack(t.column("observation.state").to_numpy(zero_copy_only=False)).astype(np.float32)
            images = {}
            for cam, key in cams.items():
                if feats[key]["dtype"] == "image":
                    images[cam] = np.stack([_png_decode(v["bytes"], f"{where} {key} frame {j}")
                                            for j, v in enumerate(t.column(key).to_pylist())])
                else:
                    images[cam] = _read_video(src, info, key, ep, fps, cameras[cam], len(action), where)
            task_ids = np.asarray(t.column("task_index").to_numpy())
            instruction = ep["tasks"][0] if ep.get("tasks") else tasks.get(int(task_ids[0]), "")
            if SUBTASK_KEY in t.column_names and subtasks:
                labels = [subtasks[j] for j in t.column(SUBTASK_KEY).to_numpy()]
            else:
                labels = [instruction] * len(action)
            kw = {}
            if "next.reward" in t.column_names:
                kw["reward"] = np.asarray(t.column("next.reward").to_numpy(), np.float32).reshape(-1)
            if "next.success" in t.column_names:
                kw["success"] = np.asarray(t.column("next.success").to_numpy(zero_copy_only=False), bool).reshape(-1)
            writer.add_episode(action=action, state=state, images=images, subtasks=labels, instruction=instruction,
                               task=ep.get("vla/task") or instruction, seed=int(ep.get("vla/seed", i)), **kw)
    return EpisodeStore(out)


def _names(feat: dict) -> list[str] | None:
    names = feat.get("names")
    if isinstance(names, dict):  # older LeRobot datasets: {"motors": [...]}
        names = next(iter(names.values()), None)
    if isinstance(names, list) and len(names) == int(feat["shape"][0]) and all(isinstance(n, str) for n in names):
        return names
    return None


def _read_tasks(path: Path) -> dict[int, str]:
    import pyarrow.parquet as pq

    if not path.is_file():
        return {}
    t = pq.read_table(str(path))
    text = next((c for c in t.column_names if c != "task_index" and str(t.schema.field(c).type) in ("string",
                                                                                                    "large_string")),
                None)
    if text is None or "task_index" not in t.column_names:
        raise StoreError(f"{path}: expected columns task_index and the task text, got {t.column_names}")
    return dict(zip(t.column("task_index").to_pylist(), t.column(text).to_pylist()))


def _read_video(src: Path, info: dict, key: str, ep: dict, fps: float, size: tuple[int, int], t: int,
                where: str) -> np.ndarray:
    from vla.datasets.video import decode_range

    f = src / info.get("video_path", VIDEO_PATH).format(
        video_key=key, chunk_index=int(ep[f"videos/{key}/chunk_index"]), file_index=int(ep[f"videos/{key}/file_index"]))
    if not f.is_file():
        raise StoreError(f"{where}: video {f} is missing")
    start = int(round(float(ep[f"videos/{key}/from_timestamp"]) * fps))
    return decode_range(f, start, t, fps, size)  # (T, H, W, 3)
