"""``EpisodeWriter``: create a store or append to it, one validated, atomic episode at a time.

Write order per episode (the commit protocol; see ``vla.datasets.store`` for the layout):
data rows, per-episode meta entries, root attributes (string tables, statistics, the index
copy), and last ``meta/episode_ends``. Opening an existing store truncates rows a crashed writer
left behind. Writes run with zarr's ``write_empty_chunks`` on, so every chunk exists on disk.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from vla.datasets.layout import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_ATTR,
    INDEX_KEYS,
    INTEGRITY,
    LOCK_NAME,
    OPTIONAL_KEYS,
    StoreError,
    committed_episodes,
    compressor,
    data_arrays,
    default_chunk_frames,
    empty_index,
    get_array,
    meta_arrays,
    open_group,
    partial_files,
    read_checked,
    required_arrays,
    stats_record_from,
    truncate,
    writing_empty_chunks,
)
from vla.datasets.stats import RunningStats


class EpisodeWriter:
    """Create a store, or open an existing one for appending; ``add_episode`` appends atomically.

    ``cameras`` maps camera name -> (H, W). ``image_chunk_frames`` (frames per image chunk)
    defaults to about 1 MiB of pixels per chunk; ``image_shuffle`` is the blosc shuffle of the
    image arrays (see the module docstring). Opening an existing store checks that env,
    fps, cameras, dims (and names, when given) match, and truncates orphan rows left by a
    crashed writer before anything is appended.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        env: str,
        fps: float,
        cameras: Mapping[str, Sequence[int]],
        action_dim: int,
        state_dim: int,
        action_names: Sequence[str] | None = None,
        state_names: Sequence[str] | None = None,
        image_chunk_frames: int | None = None,
        compression_level: int = 3,
        image_shuffle: str = "noshuffle",
        env_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        if image_shuffle not in ("noshuffle", "bitshuffle", "shuffle"):
            raise StoreError(
                f"EpisodeWriter: image_shuffle must be noshuffle|bitshuffle|shuffle, got {image_shuffle!r}"
            )
        schema = self._validate_schema(env, fps, cameras, action_dim, state_dim, action_names, state_names)
        schema["env_options"] = self._validate_env_options(env_options)
        self._lock_file = None
        self._group = None
        if self.path.exists() and (self.path / "zarr.json").exists():
            self._acquire_lock()
            self._open_existing(schema)
        else:
            if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
                raise StoreError(
                    f"{self.path} exists and is not a vla episode store (no zarr.json); refusing to write into it"
                )
            self._create(schema, image_chunk_frames, compression_level, image_shuffle)
            self._acquire_lock()
        self._closed = False

    # -- schema ---------------------------------------------------------------------------

    @staticmethod
    def _validate_schema(env, fps, cameras, action_dim, state_dim, action_names, state_names) -> dict:
        where = "EpisodeWriter"
        if not isinstance(env, str) or not env:
            raise StoreError(f"{where}: env must be a non-empty str, got {env!r}")
        if isinstance(fps, bool) or not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0:
            raise StoreError(f"{where}: fps must be a positive number, got {fps!r}")
        if not isinstance(cameras, Mapping) or not cameras:
            raise StoreError(f"{where}: cameras must be a non-empty dict {{name: (H, W)}}, got {cameras!r}")
        cams = {}
        for name, hw in cameras.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise StoreError(f"{where}: camera name must be a non-empty str without '/', got {name!r}")
            try:
                h, w = (int(v) for v in hw)
            except (TypeError, ValueError):
                raise StoreError(f"{where}: camera '{name}' size must be (H, W), got {hw!r}") from None
            if h <= 0 or w <= 0:
                raise StoreError(f"{where}: camera '{name}' size must be positive, got {hw!r}")
            cams[name] = [h, w]
        dims = {}
        for key, d in (("action_dim", action_dim), ("state_dim", state_dim)):
            if isinstance(d, bool) or not isinstance(d, int | np.integer) or d <= 0:
                raise StoreError(f"{where}: {key} must be a positive int, got {d!r}")
            dims[key] = int(d)
        names = {}
        for key, n, d in (("action_names", action_names, dims["action_dim"]),
                          ("state_names", state_names, dims["state_dim"])):
            if n is None:
                names[key] = None
                continue
            n = list(n)
            if len(n) != d or not all(isinstance(s, str) for s in n):
                raise StoreError(f"{where}: {key} must be {d} strings (one per dim), got {n!r}")
            names[key] = n
        return {"env": env, "fps": float(fps), "cameras": cams, **dims, **names}

    @staticmethod
    def _validate_env_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
        """The ``make_env`` options that define the episodes' world (e.g. tabletop ``layout``), JSON values."""
        if options is None:
            return {}
        if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
            raise StoreError(f"EpisodeWriter: env_options must be a dict {{name: value}}, got {options!r}")
        bad = {k: v for k, v in options.items() if not isinstance(v, str | int | float | bool)}
        if bad:
            raise StoreError(f"EpisodeWriter: env_options values must be str/int/float/bool, got {bad!r}")
        return dict(options)

    def _create(self, schema: dict, image_chunk_frames: int | None, clevel: int, image_shuffle: str) -> None:
        import zarr
        from zarr.storage import LocalStore

        import vla

        if image_chunk_frames is None:
            image_chunk_frames = min(default_chunk_frames(h, w) for h, w in schema["cameras"].values())
        if int(image_chunk_frames) <= 0:
            raise StoreError(f"EpisodeWriter: image_chunk_frames must be positive, got {image_chunk_frames!r}")
        attrs = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            **schema,
            "vla_version": vla.__version__,
            "image_chunk_frames": int(image_chunk_frames),
            "compression": {"codec": "blosc", "cname": "zstd", "clevel": int(clevel), "shuffle": "bitshuffle",
                            "image_shuffle": image_shuffle},
            "strings": {"instructions": [], "subtasks": [], "tasks": []},
            "stats": None,
            "integrity": dict(INTEGRITY),
            INDEX_ATTR: empty_index(),
        }
        self.path.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(store=LocalStore(str(self.path)), mode="w")
        data = group.create_group("data")
        images = data.create_group("images")
        meta = group.create_group("meta")
        comp = compressor(clevel)
        # 1024 rows (a few episodes) per low-dim chunk: a damaged chunk costs only the episodes
        # it holds, and low-dim arrays are small, so more files cost little.
        lowdim_chunk = 1024
        a, s = schema["action_dim"], schema["state_dim"]
        data.create_array("action", shape=(0, a), chunks=(lowdim_chunk, a), dtype="float32", compressors=comp)
        data.create_array("state", shape=(0, s), chunks=(lowdim_chunk, s), dtype="float32", compressors=comp)
        data.create_array("subtask", shape=(0,), chunks=(lowdim_chunk,), dtype="int32", compressors=comp)
        cf = int(image_chunk_frames)
        for cam, (h, w) in schema["cameras"].items():
            images.create_array(cam, shape=(0, h, w, 3), chunks=(cf, h, w, 3), dtype="uint8",
                                compressors=compressor(clevel, image_shuffle))
        for key, dt in (("episode_instruction", "int32"), ("episode_task", "int32"), ("episode_seed", "int64")):
            meta.create_array(key, shape=(0,), chunks=(4096,), dtype=dt, compressors=comp)
        meta.create_array("episode_ends", shape=(0,), chunks=(4096,), dtype="int64", compressors=comp, fill_value=0)
        # The root attributes (format marker) go last: a crash during creation leaves a folder
        # that is refused as "not a vla store" rather than a half-made store.
        group.attrs.update(attrs)
        self._group = group
        self._attrs = attrs
        self._num_episodes = 0
        self._num_steps = 0
        self._running = {"action": RunningStats(a), "state": RunningStats(s)}
        self.repaired_on_open: dict[str, int] = {}

    def _open_existing(self, schema: dict) -> None:
        group, attrs = open_group(self.path, read_only=False)
        diffs = []
        for key in ("env", "fps", "cameras", "action_dim", "state_dim"):
            if attrs.get(key) != schema[key]:
                diffs.append(f"{key}: store has {attrs.get(key)!r}, writer asked for {schema[key]!r}")
        if (attrs.get("env_options") or {}) != schema["env_options"]:
            diffs.append(f"env_options: store has {attrs.get('env_options') or {}!r}, "
                         f"writer asked for {schema['env_options']!r}")
        for key in ("action_names", "state_names"):
            if schema[key] is not None and attrs.get(key) is not None and attrs.get(key) != schema[key]:
                diffs.append(f"{key}: store has {attrs.get(key)!r}, writer asked for {schema[key]!r}")
        if diffs:
            raise StoreError(f"{self.path}: cannot append, schema mismatch: " + "; ".join(diffs))
        missing = [n for n in required_arrays(attrs) if get_array(group, n) is None]
        if missing:
            raise StoreError(f"{self.path}: cannot append, store is missing arrays {missing}")
        data = data_arrays(group, attrs)
        ends_raw = read_checked(self.path, group["meta/episode_ends"], "meta/episode_ends")
        data_len = min(a.shape[0] for a in data.values())
        meta_len = min(a.shape[0] for a in meta_arrays(group).values())
        committed, problems = committed_episodes(ends_raw, data_len, meta_len)
        if problems:
            raise StoreError(f"{self.path}: store is corrupt, refusing to append: " + "; ".join(problems)
                             + f" (run `vla dataset verify {self.path} --repair`)")
        num_steps = int(ends_raw[committed - 1]) if committed else 0
        removed = truncate(group, attrs, num_steps, committed)
        for p in partial_files(self.path):
            p.unlink(missing_ok=True)
        self._group = group
        self._attrs = attrs
        self._num_episodes = committed
        self._num_steps = num_steps
        self._running = {"action": RunningStats(attrs["action_dim"]), "state": RunningStats(attrs["state_dim"])}
        if num_steps:
            self._running["action"].update(np.asarray(group["data/action"][:num_steps], np.float32))  # (N, A)
            self._running["state"].update(np.asarray(group["data/state"][:num_steps], np.float32))  # (N, S)
        stats = attrs.get("stats")
        if removed or (num_steps and (not stats or stats.get("num_steps") != num_steps)):
            raw = {k: r.result() for k, r in self._running.items()} if num_steps else None
            new_stats = stats_record_from(raw, num_steps) if num_steps else None
            group.attrs.update({"stats": new_stats})
            self._attrs["stats"] = new_stats
        index = attrs.get(INDEX_ATTR)
        if not isinstance(index, dict) or len(index.get("episode_ends", [])) != committed:
            # a store written before the index copy existed (or a crash before a commit): rebuild it
            index = {"episode_ends": [int(x) for x in ends_raw[:committed]]}
            for key in ("episode_instruction", "episode_task", "episode_seed"):
                index[key] = [int(x) for x in group[f"meta/{key}"][:committed]]
            group.attrs.update({INDEX_ATTR: index})
            self._attrs[INDEX_ATTR] = index
        if committed == 0:  # optional arrays are decided again by the next first episode
            for k in OPTIONAL_KEYS:
                if get_array(group, f"data/{k}") is not None:
                    del group[f"data/{k}"]
        self.repaired_on_open = removed

    def _acquire_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # non-POSIX: no inter-process lock
            return
        f = open(self.path / LOCK_NAME, "a+")  # noqa: SIM115 - held for the writer's lifetime
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise StoreError(f"{self.path}: another EpisodeWriter holds this store open for writing") from None
        self._lock_file = f

    # -- public ---------------------------------------------------------------------------

    @property
    def num_episodes(self) -> int:
        return self._num_episodes

    @property
    def num_steps(self) -> int:
        return self._num_steps

    def add_episode(
        self,
        *,
        action: np.ndarray,
        state: np.ndarray,
        images: Mapping[str, np.ndarray],
        subtasks: Sequence[str],
        instruction: str,
        task: str,
        seed: int,
        reward: np.ndarray | None = None,
        success: np.ndarray | None = None,
    ) -> int:
        """Validate one episode fully, then append it atomically. Returns its episode index.

        ``action`` f32[T, A] and ``state`` f32[T, S] (any float dtype is accepted and stored as
        float32), ``images`` {cam: u8[T, H, W, 3]} with exactly the store's cameras, ``subtasks``
        T labels, ``reward`` float[T] and ``success`` bool[T] optional (but consistent across
        the store). Raises ``StoreError`` naming the key, episode and step of the first problem.
        """
        if self._closed:
            raise StoreError(f"{self.path}: add_episode on a closed EpisodeWriter")
        ep = self._num_episodes
        v = self._validate(ep, action, state, images, subtasks, instruction, task, seed, reward, success)
        with writing_empty_chunks():
            self._write(ep, v)
        return ep

    def close(self) -> None:
        """Release the writer lock. The store is complete after every ``add_episode``."""
        if self._lock_file is not None:
            with contextlib.suppress(Exception):
                self._lock_file.close()
            self._lock_file = None
        self._closed = True

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- validation -----------------------------------------------------------------------

    def _validate(self, ep, action, state, images, subtasks, instruction, task, seed, reward, success) -> dict:
        at = f"episode {ep}"
        a_dim, s_dim = self._attrs["action_dim"], self._attrs["state_dim"]
        action = self._float_array("action", action, at, 2)
        t = action.shape[0]
        if t == 0:
            raise StoreError(f"{at}: empty episode (action has 0 steps); an episode needs at least one step")
        state = self._float_array("state", state, at, 2)
        if action.shape[1] != a_dim:
            raise StoreError(f"{at}: action must have shape (T, {a_dim}), got {action.shape}")
        if state.shape != (t, s_dim):
            raise StoreError(f"{at}: state must have shape ({t}, {s_dim}) (T from action), got {state.shape}")
        if not isinstance(images, Mapping):
            raise StoreError(f"{at}: images must be a dict {{camera: uint8[T, H, W, 3]}}, got {type(images).__name__}")
        cams = self._attrs["cameras"]
        missing = [c for c in cams if c not in images]
        unknown = [c for c in images if c not in cams]
        if missing or unknown:
            raise StoreError(
                f"{at}: images keys must be exactly the store's cameras {list(cams)}; "
                f"missing {missing}, unknown {unknown}"
            )
        imgs = {}
        for cam, (h, w) in cams.items():
            img = images[cam]
            if not isinstance(img, np.ndarray):
                raise StoreError(f"{at}: images['{cam}'] must be a numpy uint8 array, got {type(img).__name__}")
            if img.dtype != np.uint8:
                raise StoreError(f"{at}: images['{cam}'] must have dtype uint8, got {img.dtype}")
            if img.shape != (t, h, w, 3):
                raise StoreError(f"{at}: images['{cam}'] must have shape ({t}, {h}, {w}, 3), got {img.shape}")
            imgs[cam] = img
        if isinstance(subtasks, str | bytes) or not isinstance(subtasks, Sequence):
            raise StoreError(f"{at}: subtasks must be a list of {t} str, got {type(subtasks).__name__}")
        if len(subtasks) != t:
            raise StoreError(f"{at}: subtasks must have one label per step ({t}), got {len(subtasks)}")
        for i, s in enumerate(subtasks):
            if not isinstance(s, str):
                raise StoreError(f"{at}: subtasks[{i}] (step {i}) must be a str, got {type(s).__name__}")
        if not isinstance(instruction, str):
            raise StoreError(f"{at}: instruction must be a str, got {type(instruction).__name__}")
        if not isinstance(task, str):
            raise StoreError(f"{at}: task must be a str, got {type(task).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise StoreError(f"{at}: seed must be an int, got {type(seed).__name__}")
        out = {"action": action, "state": state, "images": imgs, "subtasks": list(subtasks),
               "instruction": instruction, "task": task, "seed": int(seed)}
        for key, val in (("reward", reward), ("success", success)):
            present = get_array(self._group, f"data/{key}") is not None
            if self._num_episodes > 0 and present != (val is not None):
                have = "has" if present else "has no"
                raise StoreError(f"{at}: the store {have} data/{key}, so every episode must {'' if present else 'not '}"
                                 f"pass {key}= (got {'None' if val is None else 'an array'})")
            if val is None:
                continue
            if key == "reward":
                arr = self._float_array("reward", val, at, 1)
            else:
                arr = np.asarray(val)
                if arr.dtype != np.bool_:
                    if arr.dtype.kind not in "iu" or not np.isin(arr, (0, 1)).all():
                        raise StoreError(f"{at}: success must be bool (or 0/1 ints), got dtype {arr.dtype}")
                    arr = arr.astype(np.bool_)
            if arr.shape != (t,):
                raise StoreError(f"{at}: {key} must have shape ({t},), got {arr.shape}")
            out[key] = arr
        return out

    @staticmethod
    def _float_array(key: str, value: Any, at: str, ndim: int) -> np.ndarray:
        if not isinstance(value, np.ndarray):
            raise StoreError(f"{at}: {key} must be a numpy float array, got {type(value).__name__}")
        if value.dtype.kind != "f":
            raise StoreError(f"{at}: {key} must have a float dtype (stored as float32), got {value.dtype}")
        if value.ndim != ndim:
            shape = "(T, D)" if ndim == 2 else "(T,)"
            raise StoreError(f"{at}: {key} must have shape {shape}, got {value.shape}")
        arr = value.astype(np.float32, copy=False)
        finite = np.isfinite(arr)
        if not finite.all():
            idx = np.argwhere(~finite)[0]
            bad = arr[tuple(idx)]
            dim = f" dim {int(idx[1])}" if ndim == 2 else ""
            what = "NaN" if np.isnan(bad) else "inf"
            extra = " (overflows float32)" if np.isfinite(value[tuple(idx)]) else ""
            raise StoreError(f"{at}: {key} has {what}{extra} at step {int(idx[0])}{dim}")
        return arr

    # -- writing --------------------------------------------------------------------------

    def _intern(self, table: list[str], values: Sequence[str]) -> np.ndarray:
        index = {s: i for i, s in enumerate(table)}
        out = np.empty(len(values), np.int32)
        for i, s in enumerate(values):
            j = index.get(s)
            if j is None:
                j = index[s] = len(table)
                table.append(s)
            out[i] = j
        return out

    def _write(self, ep: int, v: dict) -> None:
        g = self._group
        n0 = self._num_steps
        t = v["action"].shape[0]
        n1 = n0 + t
        strings = {k: list(vals) for k, vals in self._attrs["strings"].items()}
        subtask_ids = self._intern(strings["subtasks"], v["subtasks"])  # (T,)
        instr_id = int(self._intern(strings["instructions"], [v["instruction"]])[0])
        task_id = int(self._intern(strings["tasks"], [v["task"]])[0])

        if ep == 0:  # the first episode decides which optional arrays the store has
            comp = compressor(self._attrs.get("compression", {}).get("clevel", 3))
            for key, dt in (("reward", "float32"), ("success", "bool")):
                exists = get_array(g, f"data/{key}") is not None
                if key in v and not exists:
                    g["data"].create_array(key, shape=(0,), chunks=(16384,), dtype=dt, compressors=comp)
                elif key not in v and exists:
                    del g[f"data/{key}"]

        # 1. data rows (images first: the largest, most likely to be interrupted)
        rows = [(f"data/images/{cam}", img) for cam, img in v["images"].items()]
        rows += [("data/action", v["action"]), ("data/state", v["state"]), ("data/subtask", subtask_ids)]
        rows += [(f"data/{k}", v[k]) for k in OPTIONAL_KEYS if k in v]
        for name, values in rows:
            arr = g[name]
            arr.resize((n1,) + tuple(arr.shape[1:]))
            arr[n0:n1] = values
        # 2. per-episode meta entries
        for key, val in (("episode_instruction", instr_id), ("episode_task", task_id), ("episode_seed", v["seed"])):
            arr = g[f"meta/{key}"]
            arr.resize((ep + 1,))
            arr[ep] = val
        # 3. string tables, statistics and the index copy, as they will be once committed. Every
        # row the index copy names is already on disk, so it is a valid index even if the commit
        # below never happens (verify uses it only when meta arrays are lost or damaged).
        raw = {k: r.stage(v[k]) for k, r in self._running.items()}  # as of N + T rows
        stats = stats_record_from(raw, n1)
        old = self._attrs.get(INDEX_ATTR) or empty_index()
        index = {k: list(old.get(k, []))[:ep] for k in INDEX_KEYS}
        for k, val in (("episode_ends", n1), ("episode_instruction", instr_id), ("episode_task", task_id),
                       ("episode_seed", v["seed"])):
            index[k].append(int(val))
        g.attrs.update({"strings": strings, "stats": stats, INDEX_ATTR: index})
        # 4. commit
        ends = g["meta/episode_ends"]
        ends.resize((ep + 1,))
        ends[ep] = n1
        self._attrs["strings"] = strings
        self._attrs["stats"] = stats
        self._attrs[INDEX_ATTR] = index
        for r in self._running.values():
            r.commit()
        self._num_episodes = ep + 1
        self._num_steps = n1
