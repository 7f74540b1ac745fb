"""Checkpoint folders (atomic write, `last`, pruning, resolution), EMA, augmentation, schedule, sampler."""

from __future__ import annotations

import json

import pytest
import torch

from vla import checkpoint as ckpt
from vla.training.augment import AugmentConfig, augment_images, draw_params, random_shift
from vla.training.data_order import DataPosition, ResumableBatchSampler
from vla.training.ema import EMA
from vla.training.optim import lr_at


def _save(root, step, keep=2, w=None):
    w = w if w is not None else torch.randn(3, 2)
    return ckpt.save_checkpoint(
        root, step, model_state={"w": w, "b": torch.zeros(2)}, ema_state={"w": w * 0.5, "b": torch.ones(2)},
        config={"model": {"d": 1}, "train": {"seed": 0}}, normalizer={"mode": "quantile"}, tokenizer={"v": 1},
        trainer_state={"step": step, "rng": torch.get_rng_state(), "nested": {"a": [1, 2.5, "x"]}}, keep_last=keep,
    )


def test_save_writes_every_file_and_last(tmp_path):
    root = tmp_path / "checkpoints"
    w = torch.randn(3, 2)
    d = _save(root, 5, w=w)
    assert d.name == "step_0000005"
    assert sorted(p.name for p in d.iterdir()) == sorted(ckpt.FILES)
    assert (root / "last").read_text().strip() == "step_0000005"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp leftovers
    assert torch.equal(ckpt.load_tensors(d / "model.safetensors")["w"], w)
    assert torch.equal(ckpt.load_tensors(d / "ema.safetensors")["w"], w * 0.5)
    st = ckpt.load_trainer_state(d)
    assert st["step"] == 5 and st["nested"] == {"a": [1, 2.5, "x"]}
    cfg = ckpt.read_config(d)
    assert cfg["format"] == ckpt.FORMAT and cfg["step"] == 5 and cfg["model"] == {"d": 1}


def test_keep_last_prunes_and_resolve_finds_newest(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for s in (1, 2, 3):
        _save(root, s, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_0000002", "step_0000003"]
    for path in (tmp_path / "run", root, root / "step_0000003"):
        assert ckpt.resolve_checkpoint(path).name == "step_0000003"
    assert ckpt.resolve_checkpoint(root / "step_0000002").name == "step_0000002"


def test_tied_weights_are_saved(tmp_path):
    emb = torch.nn.Embedding(4, 3)
    sd = {"embed.weight": emb.weight, "head.weight": emb.weight}  # shared storage
    d = ckpt.save_checkpoint(tmp_path, 1, model_state=sd, ema_state=None, config={"model": {}}, normalizer={},
                             tokenizer={}, trainer_state={})
    back = ckpt.load_tensors(d / "model.safetensors")
    assert torch.equal(back["head.weight"], emb.weight.detach())


def test_resolve_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no checkpoint under"):
        ckpt.resolve_checkpoint(tmp_path / "empty")
    d = _save(tmp_path / "c", 1)
    (d / "trainer_state.pt").unlink()
    with pytest.raises(ValueError, match=r"incomplete: missing \['trainer_state.pt'\]"):
        ckpt.resolve_checkpoint(d)


def test_foreign_or_newer_config_is_refused(tmp_path):
    d = _save(tmp_path, 1)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "version": 99}))
    with pytest.raises(ValueError, match="newer than this vla"):
        ckpt.read_config(d)
    (d / "config.json").write_text(json.dumps({**cfg, "format": "other"}))
    with pytest.raises(ValueError, match="expected format"):
        ckpt.read_config(d)


def test_trainer_state_refuses_pickled_objects(tmp_path):
    d = _save(tmp_path, 1)
    torch.save({"obj": DataPosition()}, d / "trainer_state.pt")
    with pytest.raises(ValueError, match="cannot load trainer state"):
        ckpt.load_trainer_state(d)


def test_load_weights_checked_names_mismatch():
    m = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"weight: model \(2, 3\) vs checkpoint \(4, 3\)"):
        ckpt.load_weights_checked(m, {"weight": torch.zeros(4, 3), "bias": torch.zeros(2)}, "here")
    with pytest.raises(ValueError, match="missing"):
        ckpt.load_weights_checked(m, {"weight": torch.zeros(2, 3)}, "here")


def test_ema_warmup_update_and_swap():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.9)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    # d = 0.1: shadow = 0.1 * old + 0.9 * new
    assert torch.allclose(ema.shadow["weight"], 0.1 * start["weight"] + 0.9 * m.weight)
    for _ in range(200):
        ema.update(m)
    assert ema.current_decay() == 0.9
    live = m.weight.detach().clone()
    with ema.swapped_into(m):
        assert torch.allclose(m.weight, ema.shadow["weight"])
    assert torch.equal(m.weight, live)


def test_augment_shift_is_a_translation_and_jitter_stays_in_range():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).expand(1, 3, 4, 4)
    out = random_shift(x, torch.tensor([1]), torch.tensor([2]), pad=1)  # dy=0, dx=+1 after padding
    assert torch.equal(out[0, 0, :, :3], x[0, 0, :, 1:])
    assert torch.equal(out[0, 0, :, 3], x[0, 0, :, 3])  # replicated edge
    cfg = AugmentConfig(shift=2, brightness=0.5, contrast=0.5, saturation=0.5)
    imgs = torch.rand(3, 2, 3, 8, 8) * 2 - 1
    p = draw_params(cfg, 3, 2, torch.Generator().manual_seed(0))
    a = augment_images(imgs, cfg, p)
    assert a.shape == imgs.shape and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, augment_images(imgs, cfg, draw_params(cfg, 3, 2, torch.Generator().manual_seed(0))))
    # Parameters for a global batch sliced per rank give the same result as one process.
    whole = augment_images(imgs, cfg, p)
    half = augment_images(imgs[1:], cfg, {k: v[1:] for k, v in p.items()})
    assert torch.equal(whole[1:], half)
    off = AugmentConfig(enabled=False)
    assert augment_images(imgs, off, p) is imgs
    with pytest.raises(ValueError, match="unknown keys"):
        AugmentConfig.from_dict({"shfit": 3})


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert lr_at(0, **kw) == pytest.approx(0.25)
    assert lr_at(3, **kw) == pytest.approx(1.0)
    assert lr_at(4, **kw) == pytest.approx(1.0)
    assert lr_at(9, **kw) == pytest.approx(0.55)
    assert lr_at(14, **kw) == pytest.approx(0.1)
    assert all(lr_at(s, **kw) >= lr_at(s + 1, **kw) for s in range(4, 14))


def test_sampler_shards_resumes_and_covers_epochs():
    n, b = 10, 2
    one = ResumableBatchSampler(n, 2 * b, 1, 0, seed=3)
    ranks = [ResumableBatchSampler(n, b, 2, r, seed=3) for r in range(2)]
    it1, its = iter(one), [iter(s) for s in ranks]
    seen = []
    for _ in range(one.batches_per_epoch):
        g = next(it1)
        parts = [next(i) for i in its]
        assert g == parts[0] + parts[1]  # two ranks of B == one process of 2B
        seen += g
    assert len(set(seen)) == len(seen) == 8  # drop-last, no repeats within an epoch
    # Resuming mid-epoch continues the same stream.
    full = iter(ResumableBatchSampler(n, 3, 1, 0, seed=1))
    stream = [next(full) for _ in range(7)]
    pos = DataPosition()
    for _ in range(4):
        pos.advance(n // 3)
    assert (pos.epoch, pos.position) == (1, 1)
    resumed = iter(ResumableBatchSampler(n, 3, 1, 0, seed=1, start=pos))
    assert [next(resumed) for _ in range(3)] == stream[4:]
    assert stream[:3] != stream[3:6]  # a new permutation per epoch
    with pytest.raises(ValueError, match="larger than the dataset"):
        ResumableBatchSampler(3, 4, 1, 0, seed=0)


def test_the_model_owns_its_weight_decay_groups():
    from model_helpers import tiny_config

    from vla.model import VLA

    model = VLA(tiny_config())
    decay, plain = model.optimizer_groups(0.1)
    assert (decay["name"], decay["weight_decay"]) == ("decay", 0.1)
    assert (plain["name"], plain["weight_decay"]) == ("no_decay", 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in plain["params"]}
    assert "vlm.embed.weight" in no_decay and "vlm.patch_pos.weight" in no_decay  # embedding tables
    assert all(model.get_parameter(n).ndim < 2 or "embed" in n or "pos" in n or "view" in n for n in no_decay)
    assert all(p.ndim == 2 for p in decay["params"])  # only weight matrices decay
    # every trainable parameter in exactly one group, in named_parameters order (checkpoints index by it)
    order = [id(p) for p in model.parameters()]
    assert sorted(map(order.index, map(id, decay["params"] + plain["params"]))) == list(range(len(order)))
    assert [order.index(id(p)) for p in decay["params"]] == sorted(order.index(id(p)) for p in decay["params"])

