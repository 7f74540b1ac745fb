"""MP4 frame storage, for comparison with the Zarr image arrays (``vla bench dataloader``).

LeRobot stores camera streams as one video file per episode and camera, encoded with a short
GOP (``-g 2``) so that random access only decodes a frame or two. This module does the same
with imageio-ffmpeg (H.264, yuv420p, constant quality ``crf``), and ``VideoEpisodeStore`` is an
``EpisodeStore`` whose ``read_frames`` decodes from those files, so ``WindowDataset`` can sample
windows from either backend unchanged.

It is not part of the store format: video is lossy (yuv420p chroma subsampling plus the crf
quantizer) and, with imageio-ffmpeg, every random read spawns an ffmpeg process. The Zarr
arrays stay the source of truth; this exists to measure the size/speed trade-off.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from vla.datasets.store import EpisodeStore, StoreError


def encode_video(frames: np.ndarray, path: str | os.PathLike, fps: float, crf: int = 23, gop: int = 2,
                 codec: str = "libx264") -> int:
    """Encode u8[T, H, W, 3] frames (H, W even) to an mp4 at ``path``; returns bytes written."""
    import imageio_ffmpeg

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise StoreError(f"encode_video: expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise StoreError(f"encode_video: yuv420p needs even H and W, got {h}x{w}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), fps=fps, codec=codec, pix_fmt_in="rgb24", pix_fmt_out="yuv420p", quality=None,
        macro_block_size=1, output_params=["-crf", str(crf), "-g", str(gop), "-preset", "veryfast"],
    )
    writer.send(None)  # start ffmpeg
    for i in range(t):
        writer.send(np.ascontiguousarray(frames[i]))
    writer.close()
    return path.stat().st_size


def decode_range(path: str | os.PathLike, start: int, count: int, fps: float, size: tuple[int, int]) -> np.ndarray:
    """Frames [start, start + count) of an mp4 as u8[count, H, W, 3] (seeks, then decodes ``count``)."""
    import imageio_ffmpeg

    h, w = size
    # Seek half a frame early: ffmpeg's accurate seek drops frames with pts < ss, so frame
    # ``start`` (pts start/fps) is the first one kept regardless of timestamp rounding.
    ss = max(0.0, (start - 0.5) / fps)
    gen = imageio_ffmpeg.read_frames(str(path), input_params=["-ss", f"{ss:.6f}"],
                                     output_params=["-frames:v", str(count)])
    meta = next(gen)  # noqa: F841 - the first item is the stream metadata
    out = np.empty((count, h, w, 3), np.uint8)  # (count, H, W, 3)
    n = 0
    for buf in gen:
        if n < count:
            out[n] = np.frombuffer(buf, np.uint8).reshape(h, w, 3)
        n += 1
    gen.close()
    if n < count:
        raise StoreError(f"{path}: wanted frames [{start}, {start + count}), the video ended after {n}")
    return out


def export_videos(store: EpisodeStore, folder: str | os.PathLike, crf: int = 23, gop: int = 2) -> int:
    """Write ``<folder>/<camera>/episode_<i>.mp4`` for every episode and camera; returns total bytes."""
    folder = Path(folder)
    total = 0
    for i in range(store.num_episodes):
        ep = store.get_episode(i)
        for cam, frames in ep["images"].items():
            total += encode_video(frames, folder / cam / f"episode_{i:06d}.mp4", store.fps, crf=crf, gop=gop)
    return total


class VideoEpisodeStore(EpisodeStore):
    """An ``EpisodeStore`` whose frames are decoded from ``export_videos`` output (comparison only)."""

    def __init__(self, path: str | os.PathLike, video_folder: str | os.PathLike) -> None:
        super().__init__(path, in_memory=False)
        self.video_folder = Path(video_folder)
        self._starts = self.episode_starts

    def read_frames(self, camera: str, rows: np.ndarray) -> np.ndarray:
        if camera not in self.cameras:
            raise StoreError(f"{self.path}: unknown camera '{camera}'; have {list(self.cameras)}")
        rows = np.asarray(rows, np.int64).reshape(-1)  # (R,)
        h, w = self.cameras[camera]
        out = np.empty((len(rows), h, w, 3), np.uint8)  # (R, H, W, 3)
        eps = np.searchsorted(self._ends, rows, side="right")  # (R,)
        for e in np.unique(eps):
            sel = np.flatnonzero(eps == e)
            local = rows[sel] - self._starts[e]  # (r,)
            lo, hi = int(local.min()), int(local.max())
            video = self.video_folder / camera / f"episode_{e:06d}.mp4"
            frames = decode_range(video, lo, hi - lo + 1, self.fps, (h, w))  # (hi - lo + 1, H, W, 3)
            out[sel] = frames[local - lo]
        return out
