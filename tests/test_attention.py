import pytest
import torch

from vla.attention import default_visibility, make_attn_mask, token_positions


def _grid(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r.split()] for r in rows])


def test_docstring_example_prefix_plan_actions():
    block = torch.tensor([0, 0, 0, 1, 1, 3, 3])
    causal = torch.tensor([0, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    mask = make_attn_mask(block, causal, valid, default_visibility(5))
    expected = _grid([
        "1 1 0 0 0 0 0",
        "1 1 0 0 0 0 0",
        "1 1 1 0 0 0 0",
        "1 1 0 1 0 0 0",
        "1 1 0 1 1 0 0",
        "1 1 0 1 1 1 1",
        "1 1 0 1 1 1 1",
    ])
    assert mask.shape == (1, 7, 7)
    assert torch.equal(mask[0], expected)


def test_docstring_example_frame_condition():
    sees = default_visibility(5)
    sees[4, 3] = False
    sees[3, 4] = True
    block = torch.tensor([0, 2, 3, 3, 4, 4])
    mask = make_attn_mask(block, torch.zeros(6, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool), sees)
    expected = _grid([
        "1 0 0 0 0 0",
        "1 1 0 0 0 0",
        "1 1 1 1 1 1",
        "1 1 1 1 1 1",
        "1 1 0 0 1 1",
        "1 1 0 0 1 1",
    ])
    assert torch.equal(mask[0], expected)


def test_cached_rows_equal_full_mask_rows():
    block = torch.tensor([0, 0, 1, 1, 1, 3, 3, 3])
    causal = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    valid = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    sees = default_visibility(5)
    full = make_attn_mask(block, causal, valid, sees)
    assert torch.equal(make_attn_mask(block, causal, valid, sees, num_queries=3), full[:, -3:])
    assert torch.equal(token_positions(block, valid, sees, num_queries=3), token_positions(block, valid, sees)[:, -3:])


def test_positions_skip_padding_and_siblings_share_a_start():
    sees = default_visibility(5)
    sees[4, 3] = False
    block = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4, 4])
    valid = torch.tensor([[1, 0, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    pos = token_positions(block, valid, sees)[0].tolist()
    # prefix 0,(pad),1; plan 2,3; state 4; actions 5,6; frame starts after the state too: 5,6
    assert pos[0] == 0 and pos[2:] == [1, 2, 3, 4, 5, 6, 5, 6]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="expected"):
        make_attn_mask(torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.bool),
                       torch.ones(1, 3, dtype=torch.bool), default_visibility(5))
    with pytest.raises(ValueError, match="block ids"):
        make_attn_mask(torch.tensor([0, 7]), torch.zeros(2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool),
                       default_visibility(5))
