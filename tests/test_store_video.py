"""The mp4 comparison backend: frame-accurate seeks, near-lossless decode, windows via VideoEpisodeStore."""

from __future__ import annotations

import numpy as np
from store_helpers import open_writer
from vla.datasets import EpisodeStore, WindowDataset
from vla.datasets.video import VideoEpisodeStore, decode_range, encode_video, export_videos


def _frames(n: int, h: int = 16, w: int = 16) -> np.ndarray:
    """Flat frames whose grey level encodes the frame index (easy to identify after lossy coding)."""
    return np.broadcast_to((np.arange(n, dtype=np.uint8) * 20)[:, None, None, None], (n, h, w, 3)).copy()


def test_encode_decode_is_frame_accurate(tmp_path):
    f = _frames(12)
    assert encode_video(f, tmp_path / "v.mp4", fps=10, crf=10) > 0
    for start, count in ((0, 3), (5, 2), (11, 1)):
        got = decode_range(tmp_path / "v.mp4", start, count, fps=10, size=(16, 16))
        assert got.shape == (count, 16, 16, 3)
        np.testing.assert_allclose(got.mean(axis=(1, 2, 3)), f[start:start + count].mean(axis=(1, 2, 3)), atol=3)


def test_video_store_windows_match_zarr_windows(tmp_path):
    with open_writer(tmp_path / "s", cameras={"front": (16, 16)}) as w:
        for e, n in enumerate((6, 5)):
            rng = np.random.default_rng(e)
            w.add_episode(action=rng.normal(size=(n, 3)).astype(np.float32),
                          state=rng.normal(size=(n, 4)).astype(np.float32),
                          images={"front": _frames(n)}, subtasks=["go"] * n, instruction="go", task="t", seed=e)
    export_videos(EpisodeStore(tmp_path / "s"), tmp_path / "videos", crf=10)
    a = WindowDataset(EpisodeStore(tmp_path / "s"), n_obs_steps=2, horizon=3, frame_offset=2)
    b = WindowDataset(VideoEpisodeStore(tmp_path / "s", tmp_path / "videos"), n_obs_steps=2, horizon=3, frame_offset=2)
    idx = [0, 4, 7, 10]
    x, y = a.__getitems__(idx).arrays, b.__getitems__(idx).arrays
    np.testing.assert_array_equal(x["action"], y["action"])
    np.testing.assert_allclose(x["images"]["front"].astype(float), y["images"]["front"].astype(float), atol=4)
    np.testing.assert_allclose(x["future_image"].astype(float), y["future_image"].astype(float), atol=4)
