import json

import pytest
import torch

from vla.tokenizer import ByteTokenizer


def test_round_trip_with_unicode_and_specials():
    tok = ByteTokenizer()
    text = "put the red cube in the drawer — ok"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [ord("x")]) == text  # stops at <eos>


def test_truncation_counts_specials_and_never_splits_characters():
    tok = ByteTokenizer()
    ids = tok.encode("abcdef", max_len=4, eos=True)
    assert ids == [97, 98, 99, tok.eos_id]
    assert tok.decode(tok.encode("é" * 3, max_len=3)) == "é"  # the split second character is dropped


def test_batch_encode_pads_right_with_mask():
    tok = ByteTokenizer()
    ids, mask = tok.batch_encode(["ab", "abcd", ""], max_len=8, eos=True, first=tok.plan_id)
    assert ids.shape == (3, 6) and mask.shape == (3, 6)
    assert ids[0].tolist() == [tok.plan_id, 97, 98, tok.eos_id, tok.pad_id, tok.pad_id]
    assert mask.sum(1).tolist() == [4, 6, 2]
    ids, _ = tok.batch_encode(["x" * 100], max_len=8, eos=True, first=tok.plan_id)
    assert ids.shape == (1, 8) and ids[0, -1] == tok.eos_id


def test_action_bins_round_trip_within_half_a_bin():
    tok = ByteTokenizer(action_bins=256)
    x = torch.linspace(-1, 1, 101)
    t = tok.actions_to_tokens(x)
    assert t.min() >= tok.action_offset and t.max() < tok.vocab_size
    assert (tok.tokens_to_actions(t) - x).abs().max() <= 1 / 256 + 1e-6
    assert tok.actions_to_tokens(torch.tensor([5.0, -5.0])).tolist() == [tok.vocab_size - 1, tok.action_offset]


def test_json_round_trip_and_bad_input():
    tok = ByteTokenizer(action_bins=64)
    again = ByteTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.vocab_size == tok.vocab_size and again.encode("hi") == tok.encode("hi")
    with pytest.raises(ValueError, match="expected type 'ByteTokenizer'"):
        ByteTokenizer.from_dict({"type": "Other"})
    with pytest.raises(ValueError, match="expected str"):
        tok.encode(3)
    with pytest.raises(ValueError, match="action_bins"):
        ByteTokenizer(action_bins=1)
