"""common.py section 1: attention, KV cache, RoPE, the decoding context."""
import pytest
import torch

import common


def _stack(dim=32, heads=4, depth=2, seed=0):
    torch.manual_seed(seed)
    return torch.nn.ModuleList([common.Block(dim, heads) for _ in range(depth)]).eval()


def _full(blocks, x, **kw):
    for b in blocks:
        x = b(x, causal=True, **kw)
    return x


def _incremental(blocks, x, chunk, rope=None, mask=None):
    B, T, C = x.shape
    caches = [b.attn.new_cache(B, T) for b in blocks]
    outs = []
    for s in range(0, T, chunk):
        h = x[:, s:s + chunk]
        for b, c in zip(blocks, caches):
            h = b(h, causal=True, rope=rope, pos=slice(s, s + h.shape[1]), cache=c, mask=mask)
        outs.append(h)
    return torch.cat(outs, 1), caches


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_kv_cache_decoding_equals_full_causal_forward(chunk):
    blocks, rope = _stack(), common.RoPE(8, (16,))
    x = torch.randn(2, 16, 32)
    full = _full(blocks, x, rope=rope)
    inc, caches = _incremental(blocks, x, chunk, rope=rope)
    assert caches[0].len == 16
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)


def test_kv_cache_with_key_padding_mask():
    blocks = _stack()
    x = torch.randn(2, 10, 32)
    keep = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    keep[1, ..., 2:5] = False  # padded keys in the middle of sample 1's prefix
    full = _full(blocks, x, mask=keep)
    inc, _ = _incremental(blocks, x, 1, mask=keep)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)
    assert not torch.allclose(full[1], _full(blocks, x)[1], atol=1e-3)  # the mask did something


def test_rewind_and_recompute_equals_original():
    blocks, rope = _stack(), common.RoPE(8, (12,))
    x = torch.randn(2, 12, 32)
    full = _full(blocks, x, rope=rope)
    caches = [b.attn.new_cache(2, 12) for b in blocks]

    def run(h, s):
        for b, c in zip(blocks, caches):
            h = b(h, causal=True, rope=rope, pos=slice(s, s + h.shape[1]), cache=c)
        return h

    run(x[:, :6], 0)
    run(torch.randn(2, 4, 32), 6)  # a wrong guess for tokens 6..9 (as in a Jacobi iteration)
    for c in caches:
        c.rewind(4)
    again = run(x[:, 6:], 6)
    torch.testing.assert_close(again, full[:, 6:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rewind"):
        caches[0].rewind(13)
    with pytest.raises(ValueError, match="overflow"):
        caches[0].append(torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8))
    with pytest.raises(ValueError, match="RoPE positions"):
        rope(torch.zeros(1, 1, 1, 8), pos=slice(12, 13))


@pytest.mark.parametrize("grid", [(20,), (5, 6), (3, 4, 5)])
def test_rope_is_a_rotation_with_relative_positions(grid):
    head_dim = 12
    rope = common.RoPE(head_dim, grid)
    T = rope.cos.shape[0]
    x = torch.randn(1, 2, T, head_dim)
    torch.testing.assert_close(rope(x).norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    # q.k depends only on the per-axis offset: the same q, k placed at (p, p+o) and at (p', p'+o) give the same score
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"), -1).reshape(T, -1)
    index = {tuple(c.tolist()): i for i, c in enumerate(coords)}
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    offset = tuple(1 for _ in grid)
    scores = []
    for p in [tuple(0 for _ in grid), tuple(n - 2 for n in grid)]:
        i, j = index[p], index[tuple(a + b for a, b in zip(p, offset))]
        qr = rope(q.expand(1, 1, 1, head_dim), pos=torch.tensor([i]))
        kr = rope(k.expand(1, 1, 1, head_dim), pos=torch.tensor([j]))
        scores.append((qr * kr).sum())
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores[0], (q * k).sum(), atol=1e-3)  # and it is not the identity


def test_rope_splits_frequencies_per_axis():
    rope = common.RoPE(16, (4, 4))  # 8 pairs: 4 for rows, 4 for columns
    angles = torch.atan2(rope.sin, rope.cos)
    same_row = [0, 1]  # (0,0) and (0,1): only the column band moves
    assert torch.allclose(angles[same_row[0], :4], angles[same_row[1], :4])
    assert not torch.allclose(angles[same_row[0], 4:], angles[same_row[1], 4:])
    with pytest.raises(ValueError, match="sum"):
        common.RoPE(16, (4, 4), axes_dims=(3, 3))


def test_decoding_context_runs_aten_kernels_in_fp32_and_restores_the_flags():
    """`common.decoding`: inference mode, oneDNN off on CPU in fp32 (its GELU set-up dominates one-token steps) and on
    under CPU autocast (bf16 matmuls need it); the same decoded values; every flag as it was afterwards."""
    blocks, x = _stack(), torch.randn(2, 5, 32)
    ref = _incremental(blocks, x, 1)[0]
    with common.decoding("cpu"):
        assert torch.is_inference_mode_enabled() and not torch.backends.mkldnn.enabled
        out = _incremental(blocks, x, 1)[0]
    assert out.is_inference() and (out - ref).abs().max() < 1e-5
    assert torch.backends.mkldnn.enabled and not torch.is_inference_mode_enabled()
    with torch.autocast("cpu", dtype=torch.bfloat16), common.decoding("cpu"):
        assert torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # a user's choice is kept
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), common.decoding("cpu"):
            assert not torch.backends.mkldnn.enabled
    finally:
        torch.backends.mkldnn.enabled = True
    assert not out.clone().is_inference()  # a clone made outside is a normal tensor again (for autograd)
