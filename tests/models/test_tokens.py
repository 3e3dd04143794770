"""Token <-> map layouts and the two class-token rules (SPEC section 6, differences 1 and 4), on hand-made tensors."""

import pytest
import torch

from patfast.models import tokens as tk


def _tokens(b, n, c):
    # value = 100 * token + channel (+ 10000 * sample): every entry says where it came from
    t = torch.arange(n)[None, :, None] * 100 + torch.arange(c)[None, None, :] + 10000 * torch.arange(b)[:, None, None]
    return t.float()


def test_tokens_to_map_is_row_major_grid():
    x = _tokens(2, 12, 3)  # 12 tokens: h = floor(sqrt(12)) = 3, w = 4
    m = tk.tokens_to_map(x)
    assert m.shape == (2, 3, 3, 4)
    for r in range(3):
        for col in range(4):
            for ch in range(3):
                assert m[1, ch, r, col] == 10000 + 100 * (r * 4 + col) + ch


def test_tokens_to_map_rejects_a_ragged_count():
    with pytest.raises(ValueError):
        tk.tokens_to_map(_tokens(1, 17, 2))  # 17 = class token + 16: h = 4 does not divide it


def test_map_to_tokens_transpose_inverts_tokens_to_map():
    x = _tokens(2, 16, 5)
    assert torch.equal(tk.map_to_tokens(tk.tokens_to_map(x), "transpose"), x)


def test_map_to_tokens_reshape_is_the_official_scramble():
    x = _tokens(1, 4, 2)  # tokens t0..t3 with channels c0, c1
    m = tk.tokens_to_map(x)  # (1, 2, 2, 2): channel-major memory: c0 of t0..t3, then c1 of t0..t3
    out = tk.map_to_tokens(m, "reshape")
    # a plain reshape reads the channel-major memory in rows of C = 2: (t0c0, t1c0), (t2c0, t3c0), (t0c1, t1c1), ...
    expected = torch.tensor([[[0.0, 100.0], [200.0, 300.0], [1.0, 101.0], [201.0, 301.0]]])
    assert torch.equal(out, expected)
    assert not torch.equal(out, x)
    with pytest.raises(ValueError):
        tk.map_to_tokens(m, "nope")


def test_split_prefix_first_rule():
    x = _tokens(2, 17, 3)
    spatial, prefix = tk.split_prefix(x, 1, "first")
    assert torch.equal(prefix, x[:, :1]) and torch.equal(spatial, x[:, 1:])
    assert torch.equal(tk.join_prefix(spatial, prefix, "first"), x)
    spatial, prefix = tk.split_prefix(x[:, :16], 0, "first")  # Mixer/ResMLP: no prefix tokens
    assert prefix is None and spatial.shape[1] == 16


def test_split_prefix_last_rule_uses_the_last_token_only_when_not_square():
    x = _tokens(2, 17, 3)
    spatial, prefix = tk.split_prefix(x, 1, "last")
    assert torch.equal(prefix, x[:, 16:]) and torch.equal(spatial, x[:, :16])
    assert torch.equal(tk.join_prefix(spatial, prefix, "last"), x)
    sq = _tokens(2, 16, 3)  # a perfect square: no class token under the official rule, whatever num_prefix says
    spatial, prefix = tk.split_prefix(sq, 1, "last")
    assert prefix is None and torch.equal(spatial, sq)
    with pytest.raises(ValueError):
        tk.split_prefix(x, 1, "middle")
