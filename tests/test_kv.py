"""``kv.kivi``: the packing, the quantiser, and the KIVI cache layer's schedule and contents against a plain
reference written with loops over groups; memory as stored; errors. (The cache inside real model classes:
tests/test_models.py.)"""

from __future__ import annotations

import pytest
import torch

import os

from tolerances import kernel_ok

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
    """Prefill of 21 tokens and seven decode steps (bits 2, group 4, residual 8): the prefill returns its tokens
    untouched; each decode step returns the cache as stored after it — the quantised tokens dequantised, exactly as
    the loop reference quantises them, then the window in full precision — and the window's oldest whole groups are
    quantised whenever it reaches residual + group tokens."""
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
        seen += step
        if step > 1:
            assert torch.equal(ko, keys[:, :, :seen]) and torch.equal(vo, values[:, :, :seen])
        window = seen - quantized
        if window >= residual + group:
            quantized += (window - residual) // group * group
        if step == 1:
            rk, rv = _reference(keys, values, quantized, bits, group, meta)
            assert torch.equal(ko, torch.cat([rk, keys[:, :, quantized:seen]], 2))
            assert torch.equal(vo, torch.cat([rv, values[:, :, quantized:seen]], 2))
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


@pytest.fixture
def interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 must be set before Triton is imported (conftest does so without CUDA)")


@pytest.mark.parametrize("dtype,bits,h,hk,b,prefill", [
    (torch.float32, 2, 6, 2, 1, 100),  # GQA: three query heads per K/V head in one program's rows
    (torch.float16, 2, 4, 4, 2, 100),  # batch 2, one query head per K/V head, float16 metadata
    (torch.float32, 1, 4, 2, 1, 70),
    (torch.float16, 4, 8, 2, 1, 70),
    (torch.float32, 8, 2, 1, 1, 70),
    (torch.float16, 2, 4, 2, 1, 20),  # nothing quantised yet: the window alone
])
def test_kivi_decode_kernel_against_the_dequantised_cache(interpreter, monkeypatch, dtype, bits, h, hk, b, prefill):
    """``attention.kernels.kivi_decode`` (packed codes read in the kernel, the window in one more program, splits
    merged two at a time, so that the merge loops) against attention over the same cache dequantised: within the
    kernel tolerance of the fp32 oracle (err ≤ 2·err(torch in the same dtype) + atol), over three decode steps after
    a prefill; a step's update with the kernel on returns the window alone."""
    from vidsparse.attention.kernels import kivi_decode
    from vidsparse.attention.kernels.kivi_decode import kivi_decode_attention

    monkeypatch.setattr(kivi_decode, "MERGE_SPLITS", 2)

    g = torch.Generator().manual_seed(bits * 100 + prefill)
    d = 32
    cache = KV.from_spec(f"kivi:bits={bits},group=16,residual=16").make_cache()
    k = (torch.randn(b, hk, prefill, d, generator=g) + torch.linspace(-3, 3, d)).to(dtype)
    cache.update(k, torch.randn(b, hk, prefill, d, generator=g).to(dtype), 0)
    cache.set_fused("kernel")
    for _ in range(3):
        kk, vv = cache.update(torch.randn(b, hk, 1, d, generator=g).to(dtype),
                              torch.randn(b, hk, 1, d, generator=g).to(dtype), 0)
        layer = cache.layers[0]
        assert layer.fused_step and torch.equal(kk, layer.keys)
        assert kk.shape[2] == cache.get_seq_length() - layer.quantized
        q = torch.randn(b, h, 1, d, generator=g).to(dtype)
        out = kivi_decode_attention(q, layer)
        dk, dv = layer.dequantized()
        kf, vf = (torch.cat(x, 2).repeat_interleave(h // hk, 1) for x in ((dk, layer.keys), (dv, layer.values)))
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), kf.float(), vf.float())
        same = torch.nn.functional.scaled_dot_product_attention(q, kf, vf).float()
        assert kernel_ok((out.float() - ref).abs().max().item(), (same - ref).abs().max().item(), dtype)
    assert (layer.quantized > 0) == (prefill > 32)
    cache.set_fused("off")
    kk, _ = cache.update(torch.zeros(b, hk, 1, d, dtype=dtype), torch.zeros(b, hk, 1, d, dtype=dtype), 0)
    assert not cache.layers[0].fused_step and kk.shape[2] == cache.get_seq_length()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits,hk,n", [(2, 4, 5000), (4, 4, 5000), (2, 28, 3001), (1, 4, 2048)])
def test_kivi_decode_kernel_on_cuda(bits, hk, n):
    """The fused decode on CUDA at Qwen2.5-VL-7B's head shape (28 query heads, d = 128, bf16, float32 metadata)
    against attention over the dequantised cache: within the kernel tolerance of the fp32 oracle, as vidsparse's
    attention function would call it ("auto": the update returns the window alone)."""
    from vidsparse.attention.kernels.kivi_decode import kivi_decode_attention

    g = torch.Generator(device="cuda").manual_seed(bits + n)
    d, h = 128, 28
    cache = KV.from_spec(f"kivi:bits={bits}").make_cache()
    k = torch.randn(1, hk, n, d, device="cuda", generator=g) + torch.linspace(-4, 4, d, device="cuda")
    cache.update(k.bfloat16(), torch.randn(1, hk, n, d, device="cuda", generator=g).bfloat16(), 0)
    cache.set_fused("auto")
    cache.update(*(torch.randn(1, hk, 1, d, device="cuda", generator=g).bfloat16() for _ in range(2)), 0)
    layer = cache.layers[0]
    assert layer.fused_step and layer.quantized == (n - 128) // 32 * 32
    q = torch.randn(1, h, 1, d, device="cuda", generator=g).bfloat16()
    out = kivi_decode_attention(q, layer)
    dk, dv = layer.dequantized()
    kf, vf = (torch.cat(x, 2).repeat_interleave(h // hk, 1) for x in ((dk, layer.keys), (dv, layer.values)))
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), kf.float(), vf.float())
    same = torch.nn.functional.scaled_dot_product_attention(q, kf, vf).float()
    assert kernel_ok((out.float() - ref).abs().max().item(), (same - ref).abs().max().item(), torch.bfloat16)


# ---- vidkv ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("c", [64, 63])
def test_fft_signs_restore_a_signal_of_equal_magnitudes_exactly(c):
    """A group whose rfft coefficients have one magnitude each over its tokens (random signs) is what the 1-bit FFT
    codes represent exactly: as many signs as channels (the imaginary parts zero by symmetry are not stored), and
    the inverse gives the tokens back."""
    from vidsparse.kv.vidkv import fft_restore, fft_signs

    g = torch.Generator().manual_seed(c)
    nf = c // 2 + 1
    mag = torch.rand(2, nf, generator=g) + 0.5
    sign = lambda: torch.randint(0, 2, (32, nf), generator=g).float() * 2 - 1  # noqa: E731
    im = sign() * mag[1]
    im[:, 0] = 0
    if c % 2 == 0:
        im[:, -1] = 0
    x = torch.fft.irfft(torch.complex(sign() * mag[0], im), n=c, dim=-1)
    signs, scales = fft_signs(x)
    assert signs.shape == (32, c) and scales.shape == (2, nf)
    torch.testing.assert_close(fft_restore(signs, scales, c), x, atol=1e-5, rtol=1e-5)


def test_ternary_codes_and_scale_against_a_loop():
    from vidsparse.kv.vidkv import ternary

    x = torch.randn(5, 32, 8, generator=torch.Generator().manual_seed(1))
    t, s = ternary(x, 1)
    for i in range(5):
        for ch in range(8):
            col = x[i, :, ch]
            thr = 0.5 * col.abs().mean()
            want = [1 if a > thr else -1 if a < -thr else 0 for a in col.tolist()]
            assert t[i, :, ch].tolist() == want
            kept = col.abs()[torch.tensor(want) != 0]
            assert torch.allclose(s[i, 0, ch], kept.mean() if len(kept) else torch.tensor(0.0))


def test_vidkv_layer_against_per_group_reference():
    """The stored codes, unpacked, equal a per-group computation from the primitives: the top-range half of the
    channels 2-bit min–max per channel, the rest the FFT signs, values ternary per channel; at key_bits 2 the keys
    are kivi's 2-bit keys exactly; an outlier channel stays within half a 2-bit step; the bytes stored are the
    codes, bitmasks and scales."""
    from vidsparse.kv.kivi import dequantize, quantize
    from vidsparse.kv.vidkv import fft_restore, fft_signs, ternary

    g = torch.Generator().manual_seed(5)
    b, h, n, d = 1, 2, 200, 32
    k = torch.randn(b, h, n, d, generator=g)
    k[..., 7] *= 20  # an anomalous channel
    v = torch.randn(b, h, n, d, generator=g)
    cache = KV.from_spec("vidkv:group=16,residual=16").make_cache()
    cache.update(k, v, 0)
    layer = cache.layers[0]
    t = layer.quantized
    assert t == (n - 16) // 16 * 16
    dk, dv = layer.dequantized()
    for hh in range(h):
        for g0 in range(0, t, 16):
            kg, vg = k[0, hh, g0:g0 + 16], v[0, hh, g0:g0 + 16]
            rng = kg.amax(0) - kg.amin(0)
            hi = torch.argsort(rng, descending=True, stable=True)[:16].sort().values
            lo = torch.tensor([c for c in range(d) if c not in hi.tolist()])
            want = torch.empty(16, d)
            c, sc, mn = quantize(kg[:, hi], 2, 0, torch.float32)
            want[:, hi] = dequantize(c, sc, mn, torch.float32)
            want[:, lo] = fft_restore(*fft_signs(kg[:, lo]), d - 16)
            assert torch.equal(dk[0, hh, g0:g0 + 16], want)
            assert 7 in hi.tolist() and (dk[0, hh, g0:g0 + 16, 7] - kg[:, 7]).abs().max() <= sc[0, hi == 7] / 2 + 1e-4
            tv, sv = ternary(vg, 0)
            assert torch.equal(dv[0, hh, g0:g0 + 16], tv.float() * sv)
    m = t // 16
    meta = m * (16 * 2 + 2 * (16 // 2 + 1)) * 4 + m * d * 4  # 2-bit scale/min, FFT scales, value scales
    codes = m * (d // 8 + 16 * 16 * 2 // 8 + 16 * 16 // 8) + t * d * 2 // 8  # mask, 2-bit, signs; value codes
    window = 2 * (n - t) * d * 4
    assert cache.nbytes() == b * h * (meta + codes) + b * h * window
    two = KV.from_spec("vidkv:key_bits=2,group=16,residual=16").make_cache()
    two.update(k, v, 0)
    ref = KV.from_spec("kivi:bits=2,group=16,residual=16").make_cache()
    ref.update(k, v, 0)
    assert torch.equal(two.layers[0].dequantized()[0], ref.layers[0].dequantized()[0])
    one = KV.from_spec("vidkv:key_bits=1,group=16,residual=16").make_cache()
    one.update(k, v, 0)
    err = lambda c: (c.layers[0].dequantized()[0] - k[:, :, :t]).norm()  # noqa: E731
    assert err(two) < err(cache) < err(one)  # the 2-bit channels carry the anomalous one


def test_vidkv_errors():
    with pytest.raises(SpecError, match="key_bits"):
        KV.from_spec("vidkv:key_bits=2.5")
    cache = KV.from_spec("vidkv").make_cache()
    with pytest.raises(UnsupportedError, match="head dim 20"):
        cache.update(torch.zeros(1, 1, 4, 20), torch.zeros(1, 1, 4, 20), 0)


# ---- mustafar -------------------------------------------------------------------------------------------------------

def test_mustafar_keeps_each_tokens_largest_entries_exactly():
    """Per token, the 30% largest-magnitude entries of its key and value vectors survive unchanged and the rest are
    zero (against torch.topk per vector); the window stays dense; the bytes stored are a bitmap and the kept values
    per vector (92 of 256 bytes in bfloat16 at head dim 128)."""
    from vidsparse.kv.mustafar import prune, unprune

    g = torch.Generator().manual_seed(2)
    b, h, n, d = 1, 2, 300, 128
    k = torch.randn(b, h, n, d, generator=g).bfloat16()
    v = torch.randn(b, h, n, d, generator=g).bfloat16()
    bitmap, vals = prune(k, 38)
    assert bitmap.shape == (b, h, n, 16) and vals.shape == (b, h, n, 38)
    want = torch.zeros_like(k).scatter(-1, k.abs().topk(38, -1).indices, k.gather(-1, k.abs().topk(38, -1).indices))
    assert torch.equal(unprune(bitmap, vals), want)
    cache = KV.from_spec("mustafar").make_cache()  # sparsity 0.7: 38 of 128 kept
    kk, vv = cache.update(k, v, 0)
    assert torch.equal(kk, k)  # the prefill attends in full
    layer = cache.layers[0]
    t = layer.quantized
    assert t == (n - 128) // 32 * 32 and layer.keep == 38
    dk, dv = layer.dequantized()
    for x, got in ((k, dk), (v, dv)):
        top = x[:, :, :t].abs().topk(38, -1).indices
        assert torch.equal(got, torch.zeros_like(x[:, :, :t]).scatter(-1, top, x[:, :, :t].gather(-1, top)))
    assert torch.equal(layer.keys, k[:, :, t:])
    assert cache.nbytes() == 2 * b * h * (t * (16 + 38 * 2) + (n - t) * d * 2)


def test_mustafar_errors():
    with pytest.raises(SpecError, match="sparsity"):
        KV.from_spec("mustafar:sparsity=1")
    cache = KV.from_spec("mustafar").make_cache()
    with pytest.raises(UnsupportedError, match="head dim 20"):
        cache.update(torch.zeros(1, 1, 4, 20), torch.zeros(1, 1, 4, 20), 0)
