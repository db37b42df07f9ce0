"""``kv.kivi``: the packing, the quantiser, and the KIVI cache layer's schedule and contents against a plain
reference written with loops over groups; memory as stored; errors. (The cache inside real model classes:
tests/test_models.py.)"""

from __future__ import annotations

import pytest
import torch

from vidsparse.errors import SpecError, UnsupportedError
from vidsparse.kv.kivi import KIVICache, dequantize, pack, quantize, unpack
from vidsparse.registry import KV


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (2, 3, 32), generator=g).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 32 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)
    if bits == 2:  # the first code in the lowest bits
        assert pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).item() == 1 | 2 << 2 | 3 << 4


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_reconstructs_within_half_a_step(bits):
    g = torch.Generator().manual_seed(10 + bits)
    x = 3 * torch.randn(4, 6, 32, generator=g) + 5  # an offset channel: the minimum matters
    codes, scale, mn = quantize(x, bits, 1, torch.float32)
    assert scale.shape == mn.shape == (4, 1, 32) and codes.dtype == torch.uint8
    assert int(codes.max()) <= (1 << bits) - 1
    assert torch.equal(codes.amin(1), torch.zeros(4, 32, dtype=torch.uint8))  # each group's minimum is code 0
    back = dequantize(codes, scale, mn, torch.float32)
    assert torch.all((back - x).abs() <= scale / 2 * (1 + 1e-5) + 1e-6)
    flat = torch.full((2, 4, 8), 1.25)  # a constant group: scale 0, reconstructed exactly
    c, s, m = quantize(flat, bits, 1, torch.float16)
    assert torch.equal(s, torch.zeros_like(s)) and torch.equal(dequantize(c, s, m, torch.float32), flat)


def _reference(keys, values, n, bits, group, meta):
    """The first ``n`` tokens quantised as KIVI does, with loops over groups: keys per channel over each group of
    ``group`` tokens, values per token over each group of ``group`` channels."""
    levels = (1 << bits) - 1

    def qd(x):  # one group, 1-D or reduced along dim 0
        xf = x.float()
        mn = xf.amin(0).to(meta)
        scale = ((xf.amax(0) - mn.float()) / levels).to(meta)
        step = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        codes = ((xf - mn.float()) / step).round().clamp(0, levels)
        return (codes * scale.float() + mn.float()).to(x.dtype)

    k = keys[:, :, :n].clone()
    v = values[:, :, :n].clone()
    d = keys.shape[-1]
    for b in range(k.shape[0]):
        for h in range(k.shape[1]):
            for t0 in range(0, n, group):
                k[b, h, t0:t0 + group] = qd(keys[b, h, t0:t0 + group])
            for t in range(n):
                for c0 in range(0, d, group):
                    v[b, h, t, c0:c0 + group] = qd(values[b, h, t, c0:c0 + group])
    return k, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kivi_layer_schedule_and_contents_against_loops(dtype):
    """Prefill of 21 tokens and seven decode steps (bits 2, group 4, residual 8): each call returns the cache as it
    stood before it — the quantised tokens dequantised, exactly as the loop reference quantises them — then the new
    tokens untouched; the window's oldest whole groups are quantised whenever it reaches residual + group tokens."""
    g = torch.Generator().manual_seed(3)
    bits, group, residual = 2, 4, 8
    total = 28
    keys = (torch.randn(2, 3, total, 16, generator=g) * 2 + torch.arange(16) / 4).to(dtype)
    values = torch.randn(2, 3, total, 16, generator=g).to(dtype)
    meta = torch.float16 if dtype == torch.float16 else torch.float32
    cache = KV.from_spec(f"kivi:bits={bits},group={group},residual={residual}").make_cache()
    assert isinstance(cache, KIVICache)
    quantized, seen = 0, 0
    for step in [21] + [1] * 7:
        ko, vo = cache.update(keys[:, :, seen:seen + step], values[:, :, seen:seen + step], 0)
        rk, rv = _reference(keys, values, quantized, bits, group, meta)
        assert torch.equal(ko, torch.cat([rk, keys[:, :, quantized:seen + step]], 2))
        assert torch.equal(vo, torch.cat([rv, values[:, :, quantized:seen + step]], 2))
        seen += step
        window = seen - quantized
        if window >= residual + group:
            quantized += (window - residual) // group * group
        layer = cache.layers[0]
        assert (layer.quantized, layer.keys.shape[2], cache.get_seq_length()) == (quantized, seen - quantized, seen)
    assert quantized == 20  # flushes at 21 (12 tokens), 24 and 28: the check reaches the quantised part
    rk, rv = _reference(keys, values, quantized, bits, group, meta)
    dk, dv = cache.layers[0].dequantized()
    assert torch.equal(dk, rk) and torch.equal(dv, rv)
    assert not torch.equal(dk, keys[:, :, :quantized])  # two bits lose something: the comparison has teeth


def test_kivi_stores_packed_codes_and_metadata():
    """The bytes stored at 2 bits, group 32, head dim 128 (bfloat16: float32 scales and minima) equal the packed
    codes plus the metadata plus the full-precision window: a quarter of bfloat16's bytes for the quantised tokens."""
    b, h, n, d = 1, 2, 1000, 128
    cache = KV.from_spec("kivi").make_cache()  # bits 2, group 32, residual 128
    k = torch.randn(b, h, n, d, dtype=torch.bfloat16)
    cache.update(k, k.clone(), 0)
    t = cache.layers[0].quantized
    assert t == (n - 128) // 32 * 32 and cache.entries(0) == n
    codes = 2 * b * h * t * d * 2 // 8
    meta = b * h * (t // 32) * d * 2 * 4 + b * h * t * (d // 32) * 2 * 4
    window = 2 * b * h * (n - t) * d * 2
    assert cache.nbytes() == codes + meta + window
    assert codes + meta == b * h * t * 128  # 64 + 64 bytes a token's key and value, against 512 in bfloat16
    assert cache.nbytes() < 0.36 * 2 * k.numel() * 2  # with the window's 136 tokens


def test_kivi_errors_and_batch_operations():
    with pytest.raises(SpecError, match="bits"):
        KV.from_spec("kivi:bits=3")
    with pytest.raises(SpecError, match="group"):
        KV.from_spec("kivi:group=0")
    cache = KV.from_spec("kivi:group=32").make_cache()
    with pytest.raises(UnsupportedError, match="head dim 48"):
        cache.update(torch.zeros(1, 1, 4, 48), torch.zeros(1, 1, 4, 48), 0)
    cache = KV.from_spec("kivi:bits=4,group=4,residual=4").make_cache()
    k = torch.randn(2, 1, 10, 8)
    cache.update(k, k + 1, 0)
    layer = cache.layers[0]
    assert layer.quantized == 4
    before = [x.clone() for x in layer.dequantized()]
    layer.reorder_cache(torch.tensor([1, 0]))
    after = layer.dequantized()
    assert torch.equal(after[0], before[0][[1, 0]]) and torch.equal(after[1], before[1][[1, 0]])
    assert torch.equal(layer.keys, k[[1, 0], :, 4:])
    layer.crop(-2)
    assert cache.get_seq_length() == 8
    with pytest.raises(UnsupportedError, match="quantised"):
        layer.crop(-5)
