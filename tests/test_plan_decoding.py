"""Word-plan decoding rules (docs/text.md "Decoding rules"): no repeated word or bigram within a subtask,
no empty or immediately repeated subtask, a forced <eos> at the block's last position; the same in every
decode path (`VLA.sample`, the policy, the server, `vla plan`), and in-distribution plans still decodable."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _tiny_vla import make_tiny, save_tiny  # noqa: E402

from vla.tokenizer import (  # noqa: E402
    EOS_KEY,
    PlanRules,
    PlanVocab,
    banned_next_words,
    plan_rule_violation,
    split_words,
)

LABELS = ["pick up the red cube", "pick up the blue cube", "put it in the bowl", "open the drawer",
          "close the drawer", "stack it on the red cube"]
REPETITIVE = "pick up the red cube; put it in the bowl; pick up the blue cube; put it in the bowl"
REPETITIVE_INSTRUCTION = "put the red cube and the blue cube in the bowl"
MAX_PLAN = 28


def word_model(max_plan_tokens: int = MAX_PLAN):
    vocab = PlanVocab.from_subtasks(LABELS, 8)
    return make_tiny(plan_vocab="words", plan_words=vocab.words, copy_slots=8, max_plan_tokens=max_plan_tokens)


def obs(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"images": {"corner": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)},
            "state": np.zeros(4, np.float32)}


def check_rules(text: str) -> None:
    """What the rules promise about a decoded plan, checked directly on its words."""
    subtasks = [s.split() for s in text.split(";")]
    assert all(subtasks), f"empty subtask in {text!r}"
    for s in subtasks:
        bigrams = list(zip(s, s[1:]))
        assert all(a != b for a, b in bigrams), f"a word follows itself in {text!r}"
        assert len(set(bigrams)) == len(bigrams), f"a bigram repeats within a subtask of {text!r}"
    assert all(a != b for a, b in zip(subtasks, subtasks[1:])), f"a subtask repeats the one before in {text!r}"


# ----------------------------------------------------------------------------------------------- the rules
def test_rules_block_repeats_within_a_subtask_only():
    assert banned_next_words([]) == {";", EOS_KEY}  # no empty plan / subtask
    assert banned_next_words(split_words("pick up the")) == {"the"}
    assert banned_next_words(split_words("pick up the red the")) == {"the", "red"}  # "the red" was seen
    # a new subtask starts clean: "pick up the" again is fine, the earlier subtask's bigrams do not count
    assert banned_next_words(split_words("pick up the red cube; pick up")) == {"up"}
    assert banned_next_words(split_words("go; go")) == {"go", ";", EOS_KEY}  # no immediate subtask repeat
    assert banned_next_words(split_words("go; stop; go")) == {"go"}  # "go" may come back later
    assert plan_rule_violation(REPETITIVE) is None
    assert plan_rule_violation("pick up the the cube") == "'the' after 'pick up the' is blocked"
    assert plan_rule_violation("the red the red") == "'red' after 'the red the' is blocked"
    assert plan_rule_violation("go; go") == "'<eos>' after 'go; go' is blocked"
    assert plan_rule_violation("go;") == "'<eos>' after 'go;' is blocked"
    assert plan_rule_violation("; go") == "';' at the start is blocked"
    # every subtask label the envs emit satisfies the rules on its own
    from envs.metaworld_tasks import TASK_TEXT

    for text in TASK_TEXT.values():
        assert plan_rule_violation("; ".join(text.labels)) is None, text.labels


def test_rules_compare_words_not_ids():
    """A copied "the" and the fixed "the" are the same word: switching ids does not get round the rules."""
    vocab = PlanVocab.from_subtasks(LABELS, 8)
    rules = PlanRules(vocab, "close the window")  # copy slots: close the window
    the_fixed, the_copy = vocab._id["the"], vocab.copy_offset + 1
    assert sorted(rules.banned_ids([vocab._id["pick"], vocab._id["up"], the_fixed])) == [the_fixed, the_copy]
    assert sorted(rules.banned_ids([vocab._id["pick"], vocab._id["up"], the_copy])) == [the_fixed, the_copy]
    assert sorted(rules.banned_ids([])) == sorted([vocab.eos_id, vocab._id[";"]])


def test_store_plan_that_breaks_the_rules_is_refused_at_training_start():
    from types import SimpleNamespace

    from vla.model_config import plan_words_from_store

    def store(labels, table):
        lab = np.asarray(labels)
        return SimpleNamespace(subtask_table=table, lowdim=lambda k: lab, episode_starts=[0], episode_ends=[len(lab)],
                               path="s.zarr")

    ok = store([0, 0, 1, 1, 0, 2], ["pick up the red cube", "put it in the bowl", "pick up the blue cube"])
    assert "bowl" in plan_words_from_store(ok, 8, max_plan_tokens=32)
    bad = store([0, 1], ["pick up the cube", "push the cube to the cube to the left"])
    with pytest.raises(ValueError, match=r"plan 'pick up the cube; push the cube to the cube to the left' in "
                                         r"s.zarr breaks the plan decoding rules \('cube' after "
                                         r"'pick up the cube; push the cube to the' is blocked"):
        plan_words_from_store(bad, 8, max_plan_tokens=32)


# ----------------------------------------------------------------------------------------------- in the model
def scripted_plan(vocab: PlanVocab, plan: str, instruction: str):
    """A plan_logits replacement that scores the tokens of ``plan`` one after the other (the k-th call -> token k)."""
    target = vocab.encode(plan, instruction)[1:]  # after <plan>, <eos> included
    calls = []

    def plan_logits(h, words):
        k = min(len(calls), len(target) - 1)
        calls.append(k)
        out = torch.zeros(*h.shape[:2], vocab.vocab_size)
        out[..., target[k]] = 10.0
        return out

    return plan_logits, calls


@pytest.mark.parametrize("use_cache", [True, False])
def test_repetitive_in_distribution_plan_still_decodes(use_cache):
    """Subtasks that repeat across the plan ("pick up the ...", "put it in the bowl" twice), with words copied
    from the instruction, come out exactly: the rules look within a subtask and at the one subtask before."""
    from vla.policies.vla_policy import VLAPolicy

    model, proc = word_model()
    model.eval()
    vocab = model.plan_vocab
    ids = vocab.encode(REPETITIVE, REPETITIVE_INSTRUCTION)
    assert any(i >= vocab.copy_offset for i in ids) and len(ids) <= MAX_PLAN  # copies involved, fits the block
    model.plan_logits, calls = scripted_plan(vocab, REPETITIVE, REPETITIVE_INSTRUCTION)
    out = model.sample(proc.observation_batch([obs()], [REPETITIVE_INSTRUCTION]), use_cache=use_cache)
    assert out["plan_text"] == [REPETITIVE]
    assert out["plan_tokens"][0].tolist() == ids
    # a global no-repeat-bigram rule would have blocked it ("pick up" comes back)
    words = split_words(REPETITIVE)
    assert len(set(zip(words, words[1:]))) < len(words) - 1
    calls.clear()
    policy = VLAPolicy(model, proc, n_action_steps=4, seed=0)
    policy.use_cache = use_cache
    chunk = policy.predict_chunk(obs(), REPETITIVE_INSTRUCTION)
    assert chunk.plan == REPETITIVE.split("; ")


def test_plan_that_fills_the_block_exactly_is_unchanged():
    """The forced <eos> lands where a trained full-length plan puts its own <eos>."""
    model, proc = word_model(max_plan_tokens=len(split_words(REPETITIVE)) + 2)
    model.eval()
    model.plan_logits, _ = scripted_plan(model.plan_vocab, REPETITIVE, REPETITIVE_INSTRUCTION)
    out = model.sample(proc.observation_batch([obs()], [REPETITIVE_INSTRUCTION]))
    assert out["plan_text"] == [REPETITIVE]


DEGENERATE_SCORES = {"the": 10.0, "pick": 8.0, "up": 7.0, ";": 1.0}  # <eos> least of all: never stops


def degenerate_plan_logits(self, h, words):
    """Scores of a planner that has collapsed on "the" and never wants to stop (class-level patch of VLA)."""
    pv = self.plan_vocab
    out = torch.zeros(*h.shape[:2], pv.vocab_size)
    for w, s in DEGENERATE_SCORES.items():
        out[..., pv._id[w]] = s
    out[..., pv.copy_offset:] = words[1][:, None].float() * 9.0 - 1.0  # copied words next best ("the" copy too)
    out[..., pv.copy_offset:] = out[..., pv.copy_offset:].masked_fill(~words[1][:, None], float("-inf"))
    out[..., pv.eos_id] = -5.0
    out[..., pv.pad_id] = out[..., pv.plan_id] = float("-inf")
    return out


def test_degenerate_planner_cannot_repeat_and_always_stops(tmp_path, monkeypatch, capsys):
    """The planner's argmax is "the" at every step and <eos> never: unconstrained greedy decoding would give
    "the the the ..." without an end. Every decode path gives the same plan, which obeys the rules and ends
    with <eos> within max_plan_tokens."""
    import cv2
    from vla.policies.vla_policy import VLAPolicy

    from vla.commands import plan as plan_cmd
    from vla.model import VLA
    from vla.serving import PolicyClient, PolicyServer

    model, proc = word_model()
    model.eval()
    run = save_tiny(tmp_path / "run", model, proc)
    monkeypatch.setattr(VLA, "plan_logits", degenerate_plan_logits)
    instruction = "close the window"
    batch = proc.observation_batch([obs(), obs(1)], [instruction, "pick up the red cube"])
    pv = model.plan_vocab
    assert degenerate_plan_logits(model, torch.zeros(2, 1, 32), model.instruction_words(batch))[..., :].argmax(-1) \
        .eq(pv._id["the"]).all()
    out = model.sample(batch)
    uncached = model.sample(batch, use_cache=False)
    assert torch.equal(out["plan_tokens"], uncached["plan_tokens"])
    for row, text in zip(out["plan_tokens"], out["plan_text"]):
        valid = row[row != pv.pad_id].tolist()
        assert valid[-1] == pv.eos_id and pv.eos_id not in valid[:-1] and len(valid) <= MAX_PLAN
        assert len(valid) == MAX_PLAN  # it never stops by itself: the forced <eos> ends it
        assert "the the" not in text
        check_rules(text)
    first = out["plan_text"][0]
    assert len(split_words(first)) == MAX_PLAN - 2
    # the policy, the server and `vla plan` decode the very same plan
    policy = VLAPolicy.from_checkpoint(run, n_action_steps=4, seed=0)
    assert "; ".join(policy.predict_chunk(obs(), instruction).plan) == first
    with PolicyServer(VLAPolicy.from_checkpoint(run, n_action_steps=4, seed=0), port=0) as server:
        client = PolicyClient("127.0.0.1", server.port)
        reply = client.infer({"observation": obs(), "instruction": instruction})
        client.close()
    assert "; ".join(reply["plan"]) == first
    png = tmp_path / "scene.png"
    cv2.imwrite(str(png), cv2.cvtColor(obs()["images"]["corner"], cv2.COLOR_RGB2BGR))
    assert plan_cmd.main([f"checkpoint={run}", f"instruction={instruction}", f"image={png}", "state=[0,0,0,0]",
                          f"run_dir={tmp_path / 'out'}"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    i = lines.index("plan:")
    assert lines[i + 1:] == first.split("; ")


def test_byte_plans_also_end_with_eos_within_the_block(monkeypatch):
    """Byte plans get the forced <eos> (they have no word boundary to apply the repeat rules at)."""
    from vla.model import VLA

    model, proc = make_tiny(max_plan_tokens=12)
    model.eval()
    tok = model.tok

    def lm_logits(self, h):  # always "a", never <eos>
        out = torch.zeros(*h.shape[:-1], tok.vocab_size)
        out[..., ord("a")] = 10.0
        out[..., tok.eos_id] = -5.0
        return out

    monkeypatch.setattr(VLA, "lm_logits", lm_logits)
    out = model.sample(proc.observation_batch([obs()], ["close the window"]))
    row = out["plan_tokens"][0].tolist()
    assert len(row) == 12 and row[-1] == tok.eos_id and out["plan_text"] == ["a" * 10]


# ----------------------------------------------------------------------------------------------- the plan grammar
TABLE = ["pick up the red cube", "pick up the blue cube", "pick up the red cylinder", "put it in the bowl",
         "put it on the plate"]


def test_skeletons_mark_the_positions_where_labels_name_things():
    from vla.tokenizer import subtask_skeletons

    assert subtask_skeletons(TABLE) == [
        (("pick", "up", "the", None, None),
         (frozenset(), frozenset(), frozenset(), frozenset({"red", "blue"}), frozenset({"cube", "cylinder"}))),
        (("put", "it", "in", "the", "bowl"), (frozenset(),) * 5),  # differs from "put it on the plate" twice
        (("put", "it", "on", "the", "plate"), (frozenset(),) * 5),
    ]


def test_grammar_takes_new_names_into_slots_but_not_new_verbs():
    from vla.tokenizer import PlanGrammar

    g = PlanGrammar(TABLE, max_subtasks=2)
    inst = "collect the purple cube and put it in the bowl"
    names = g.new_names(split_words(inst))
    assert names == {"collect", "purple", "cube", "and"}  # "put", "the", "in", "bowl" are fixed words of the table
    assert g.allowed_next([], names) == {"pick", "put"}  # "collect" cannot start a subtask
    assert g.allowed_next(split_words("pick up the"), names) == {"red", "blue", "collect", "purple", "cube", "and"}
    assert g.allowed_next(split_words("put it in"), names) == {"the"}
    assert g.allowed_next(split_words("pick up the purple cube"), names) == {";", EOS_KEY}
    assert g.allowed_next(split_words("pick up the purple cube; put it in the bowl"), names) == {EOS_KEY}  # 2 max
    assert g.violation("pick up the purple cube; put it in the bowl", inst) is None
    assert g.violation("pick up the purple cube", "put the red cube in the bowl") == \
        "'purple' after 'pick up the' is not in the plan grammar"  # not a word of this instruction
    assert g.violation("collect purple cube", inst) == "'collect' cannot start a plan"
    assert g.violation("put it in cube", inst) == "'cube' after 'put it in' is not in the plan grammar"
    assert g.violation("put it in the bowl; pick up the red cube; put it in the bowl", inst) == \
        "';' after 'put it in the bowl; pick up the red cube' is not in the plan grammar"
    with pytest.raises(ValueError, match="needs the subtask labels"):
        PlanGrammar([])


def grammar_model():
    vocab = PlanVocab.from_subtasks(TABLE, 8)
    return make_tiny(plan_vocab="words", plan_words=vocab.words, copy_slots=8, max_plan_tokens=MAX_PLAN,
                     plan_subtasks=TABLE, plan_max_subtasks=2)


@pytest.mark.parametrize("use_cache", [True, False])
def test_decoded_plans_obey_the_grammar_even_from_a_degenerate_planner(monkeypatch, use_cache):
    """The planner's favourites ("the", then copies of instruction words, never <eos>) are mostly outside the
    grammar: every decoded plan is still made of the table's subtask shapes, names copied into the slots,
    at most two subtasks, and ends with <eos> by itself (not forced at the last position)."""
    from vla.model import VLA
    from vla.tokenizer import PlanGrammar

    model, proc = grammar_model()
    model.eval()
    assert model.plan_grammar is not None
    monkeypatch.setattr(VLA, "plan_logits", degenerate_plan_logits)
    texts = ["collect the purple cube and put it in the bowl", "close the window", "pick up the red cube"]
    out = model.sample(proc.observation_batch([obs(i) for i in range(3)], texts), use_cache=use_cache)
    g = PlanGrammar(TABLE, 2)
    for row, plan, inst in zip(out["plan_tokens"], out["plan_text"], texts):
        assert g.violation(plan, inst) is None, (plan, inst)
        assert len(row[row != model.plan_vocab.pad_id]) < MAX_PLAN
        check_rules(plan)
    # without the labels (a checkpoint from before the grammar) the same planner leaves the grammar
    model.plan_grammar = None
    free = model.sample(proc.observation_batch([obs(0)], texts[:1]), use_cache=use_cache)["plan_text"][0]
    assert g.violation(free, texts[0]) is not None


def test_grammar_keeps_an_in_distribution_plan_exactly():
    model, proc = grammar_model()
    model.eval()
    plan, inst = "pick up the blue cube; put it on the plate", "put the blue cube on the plate"
    model.plan_logits, _ = scripted_plan(model.plan_vocab, plan, inst)
    assert model.sample(proc.observation_batch([obs()], [inst]))["plan_text"] == [plan]
