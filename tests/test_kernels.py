"""The C kernels (distillsr.kernels) against the PyTorch ops they replace, and the
fallback when they cannot be built. Where a C compiler exists the kernels must build:
a broken nhwc.c fails these tests; they skip only on a machine without a compiler."""
import sys

import pytest
import torch
import torch.nn.functional as F

import distillsr
from distillsr import kernels
from distillsr.models.asid import from_tokens, to_tokens


def no_compiler() -> bool:
    """The one reason to skip: the kernels cannot be built here at all."""
    return kernels.compiler() is None or not sys.platform.startswith("linux")


kernels.built()  # built at collection into the user's cache (each test gets an empty one)
pytestmark = pytest.mark.skipif(no_compiler(), reason="no C compiler (or not Linux): the C kernels "
                                                      "cannot be built here")


def test_the_kernels_build_and_load_where_a_compiler_exists():
    assert kernels.built(), f"{kernels.compiler()} is present but: {kernels.build_error()}"
    assert kernels.build_error() is None


def test_a_source_that_does_not_compile_fails_instead_of_skipping(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_SOURCE_TEXT", b"int broken( {\n")
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv("DISTILLSR_CACHE", str(tmp_path))
    assert not kernels.built()
    assert "failed" in kernels.build_error() and "nhwc.c" in kernels.build_error()
    assert not no_compiler()  # so the kernel tests run (and fail), they do not skip
    with torch.inference_mode():  # the models still run, without the C kernels
        assert not kernels.available(torch.rand(1, 8, 8, 4))
LAYOUTS = ["image", "meso", "global", "grid"]


def _tokens(x, layout):
    return x if layout == "image" else to_tokens(x.contiguous(), layout)


def _norm(c, eps=1e-5):
    torch.manual_seed(c)
    norm = torch.nn.LayerNorm(c, eps=eps)
    norm.weight.data.normal_()
    norm.bias.data.normal_()
    return norm


def _map(b, h, w, c, extra=5):
    """A channel slice of a wider map (rows with a stride), values of both signs."""
    return (torch.randn(b, h, w, c + extra) * 2 + 0.5)[..., extra:]


@pytest.mark.parametrize("c", [12, 20, 48, 6])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_norm_in_every_layout(c, layout):
    x, norm = _map(2, 16, 24, c), _norm(c)
    with torch.inference_mode():
        got = kernels.layer_norm(x, norm, layout)
        ref = _tokens(norm(x), layout)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("c", [12, 36, 10])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_add_tokens_norm(c, layout):
    x, norm = _map(2, 16, 24, c), _norm(c, eps=1e-6)
    t = _tokens(torch.randn(2, 16, 24, c), layout)
    with torch.inference_mode():
        y, z = kernels.add_tokens_norm(x, t, layout, norm)
        only = kernels.add_tokens_norm(x, t, layout)
        ref = x + (t if layout == "image" else from_tokens(t, layout, x.shape))
        ref_z = norm(ref)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(only, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(z, ref_z, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("c", [12, 36, 48, 7])
@pytest.mark.parametrize("act", [None, "gelu"])
def test_depthwise_conv(c, act):
    torch.manual_seed(c)
    conv = torch.nn.Conv2d(c, c, 3, padding=1, groups=c)
    for shape in [(2, 16, 24), (1, 5, 7), (1, 1, 3)]:
        x = _map(*shape, c)
        with torch.inference_mode():
            got = kernels.dwconv3x3(x, conv.weight, conv.bias, act=act)
            ref = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            ref = F.gelu(ref) if act else ref
            again, means = kernels.dwconv3x3(x, conv.weight, conv.bias, act=act, channel_means=True)
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-6)
        assert torch.equal(again, got)
        torch.testing.assert_close(means, ref.mean(dim=(1, 2)), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="image layout"):
        kernels.dwconv3x3(x, conv.weight, layout="meso", channel_means=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_depthwise_conv_writes_tokens_and_gates(layout):
    c = 24
    torch.manual_seed(1)
    w1, w2 = torch.randn(c, 1, 3, 3), torch.randn(c, 1, 3, 3)
    h = torch.randn(2, 16, 24, 2 * c)
    with torch.inference_mode():
        def dw(x, w):
            return F.conv2d(x.permute(0, 3, 1, 2), w, padding=1, groups=c).permute(0, 2, 3, 1)
        plain = kernels.dwconv3x3(h[..., :c], w1, layout=layout)
        gated = kernels.dwconv3x3(h[..., :c], w1, act="gelu", gate=(h[..., c:], w2), layout=layout)
        torch.testing.assert_close(plain, _tokens(dw(h[..., :c], w1), layout), atol=2e-6, rtol=1e-6)
        ref = _tokens(F.gelu(dw(h[..., :c], w1)) * dw(h[..., c:], w2), layout)
        torch.testing.assert_close(gated, ref, atol=1e-5, rtol=1e-6)


def test_bad_arguments_are_refused():
    x = torch.randn(1, 8, 8, 4)
    with pytest.raises(ValueError, match="activation"):
        kernels.dwconv3x3(x, torch.randn(4, 1, 3, 3), act="relu")
    with pytest.raises(ValueError, match="laid out"):
        kernels.dwconv3x3(x, torch.randn(4, 1, 3, 3), gate=(torch.randn(1, 8, 9, 4), torch.randn(4, 1, 3, 3)))


def test_token_norms():
    t = torch.randn(30, 64, 20)
    torch.testing.assert_close(kernels.token_norms(t), torch.linalg.vector_norm(t, dim=1), atol=1e-5, rtol=1e-6)


def test_not_used_with_autograd_or_other_dtypes():
    x = torch.randn(1, 8, 8, 4)
    assert kernels.available(x) != torch.is_grad_enabled()
    with torch.inference_mode():
        assert kernels.available(x)
        assert not kernels.available(x.double()) and not kernels.available(x.bfloat16())


def test_built_from_the_source_read_at_import(monkeypatch, tmp_path):
    # a process keeps the C source its Python side was imported with: replacing or
    # removing nhwc.c on disk afterwards cannot give it functions of other signatures
    monkeypatch.setattr(kernels, "SOURCE", tmp_path / "gone.c")
    monkeypatch.setenv("DISTILLSR_CACHE", str(tmp_path / "cache"))
    built = kernels._compile()
    assert built is not None and built.exists()
    assert sorted(p.suffix for p in built.parent.iterdir()) == [".so"]  # no stray files


def test_the_model_runs_without_them_and_agrees(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = distillsr.create_model("asid", 3)
    x = torch.rand(1, 3, 20, 27)
    with torch.inference_mode():
        paper = model.eval()(x)
        model.prepare_for_inference()
        fast = model(x)
        with monkeypatch.context() as m:
            m.setattr(kernels, "enabled", False)
            merged = model(x)
    # a machine without a C compiler: nothing is built, oneDNN and PyTorch run
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DISTILLSR_CACHE", str(tmp_path))
    with torch.inference_mode():
        assert not kernels.available(x)
        without = model(x)
    assert not list(tmp_path.glob("kernels/*.so"))
    for got in (fast, merged, without):
        torch.testing.assert_close(got, paper, atol=2e-6, rtol=0)


def test_one_switch_turns_every_fused_kernel_off(monkeypatch):
    from distillsr.kernels import ops
    calls = []
    names = ("norm_linear", "gfn_rows", "qkv_rows", "add_tokens_norm", "dwconv3x3", "attend_add_norm",
             "attention_scores", "linear", "upsample_conv", "channel_attention", "conv3x3")
    for name in names:
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    if ops.HAS_ONEDNN:
        real_mkldnn = ops._MKLDNN

        class Spy:
            def __getattr__(self, name):
                calls.append(name)
                return getattr(real_mkldnn, name)
        monkeypatch.setattr(ops, "_MKLDNN", Spy())
    model = distillsr.create_model("asid", 2, blocks=1).prepare_for_inference()
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        with monkeypatch.context() as m:
            m.setattr(kernels, "enabled", False)
            model(x)
        assert calls == []
        real_cat = torch.cat
        m_cats = []
        monkeypatch.setattr(torch, "cat", lambda *a, **k: m_cats.append(1) or real_cat(*a, **k))
        model(x)
    # an IDB's concatenations are read in place by the 1x1 convs after them
    assert set(names) <= set(calls) and m_cats == []
    # with the C kernels every 1x1 conv runs in C; oneDNN sums fuse's conv into F0
    assert not ops.HAS_ONEDNN or "_convolution_pointwise_" in calls


@pytest.mark.parametrize("d", [12, 24, 36])
@pytest.mark.parametrize("layout", ["meso", "global"])
@pytest.mark.parametrize("hw", [(16, 24), (8, 80)])  # grid rows of 3 groups, of 8 + 2
def test_attention_output_added_and_normalised(d, layout, hw):
    torch.manual_seed(d)
    x, norm = _map(2, *hw, d), _norm(d, eps=1e-6)
    groups = 2 * (hw[0] // 8) * (hw[1] // 8)
    attn = torch.softmax(torch.randn(groups, 64, 64) * 3, dim=-1)
    v = torch.randn(groups, 64, 3 * d)[..., 2 * d:]  # the values of a qkv tensor, read in place
    with torch.inference_mode():
        y, z = kernels.attend_add_norm(attn, v, x, layout, norm)
        assert torch.equal(kernels.attend_add_norm(attn, v.contiguous(), x, layout, norm)[0], y)
        ref = x + from_tokens(torch.bmm(attn, v), layout, x.shape)
        ref_z = norm(ref)
        assert kernels.attend_add_norm(attn, v[..., :10], x[..., :10], layout, norm) is None  # width not compiled
        with pytest.raises(ValueError, match="do not fit"):
            kernels.attend_add_norm(attn[:5], v[:5], x, layout, norm)
    torch.testing.assert_close(y, ref, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(z, ref_z, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("d", [12, 36, 7])
def test_attention_scores_are_a_softmax_of_biased_scaled_products(d):
    torch.manual_seed(d)
    qkv = torch.randn(5, 64, 3 * d) * 2  # large logits: the max subtraction matters
    bias = torch.randn(64, 64)
    scale = d ** -0.5
    q, k, _ = qkv.chunk(3, dim=-1)
    with torch.inference_mode():
        got = kernels.attention_scores(qkv, bias, scale)
        ref = torch.baddbmm(bias, q, k.transpose(-2, -1), alpha=scale).softmax(dim=-1)
        with pytest.raises(ValueError, match="64, 3d"):
            kernels.attention_scores(qkv[:, :60], bias, scale)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(5, 64))


@pytest.mark.parametrize("n, k", [(12, 12), (16, 48), (24, 36), (32, 8), (36, 36), (48, 48), (48, 5),
                                  (72, 24), (96, 48), (108, 36), (144, 48), (60, 12)])
@pytest.mark.parametrize("extra", ["none", "bias", "bias+gelu", "bias+sigmoid", "add", "strided add"])
def test_small_products(n, k, extra):
    torch.manual_seed(n * 100 + k)
    x = _map(1, 5, 7, k)  # 35 rows (not a multiple of the row blocks), strided
    w, b = torch.randn(n, k) * 0.3, torch.randn(n)
    add = torch.randn(1, 5, 7, n + 5)[..., 2:n + 2] if extra == "strided add" else torch.randn(1, 5, 7, n)
    kw = {"bias": b} if "bias" in extra else {}
    act = extra.split("+")[1] if "+" in extra else None
    with torch.inference_mode():
        got = kernels.linear(x, w, act=act, add=add if "add" in extra else None, **kw)
        ref = F.linear(x, w, kw.get("bias"))
        ref = (F.gelu(ref) if act == "gelu" else torch.sigmoid(ref) if act == "sigmoid"
               else ref + add if "add" in extra else ref)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


def test_small_products_refuse_other_widths():
    x = torch.randn(10, 8)
    with torch.inference_mode():
        assert kernels.linear(x, torch.randn(20, 8)) is None
        assert kernels.linear(x, torch.randn(50, 8)) is None
        assert kernels.linear(x, torch.randn(12, 8), act="relu") is None


@pytest.mark.parametrize("shape", [(1, 360 // 8, 640 // 8, 48), (2, 5, 21, 37), (1, 17, 3, 12)])
def test_nhwc_to_nchw(shape):
    torch.manual_seed(sum(shape))
    wide = torch.randn(*shape[:3], shape[3] + 3)
    for x in (wide[..., :shape[3]].contiguous(), wide[..., 2:shape[3] + 2]):  # contiguous, channel slice
        y = kernels.to_nchw(x)
        assert y.is_contiguous() and y.shape == (shape[0], shape[3], shape[1], shape[2])
        assert torch.equal(y, x.permute(0, 3, 1, 2))


@pytest.mark.parametrize("widths", [(36, 12), (12, 12, 12, 12), (24, 12), (5, 7)])
def test_small_product_of_a_concatenation(widths):
    """``linear([a, b, ...], w)`` equals ``linear(cat([a, b, ...]), w)``, parts strided or not."""
    torch.manual_seed(sum(widths))
    base = torch.randn(1, 6, 7, sum(widths) + 9)
    parts, c = [], 0
    for i, k in enumerate(widths):
        p = base[..., c + 1:c + 1 + k] if i % 2 else torch.randn(1, 6, 7, k)
        parts.append(p)
        c += k + 1
    n = 48 if sum(widths) >= 24 else 12
    w, b = torch.randn(n, sum(widths)) * 0.3, torch.randn(n)
    with torch.inference_mode():
        got = kernels.linear(parts, w, b)
        ref = F.linear(torch.cat(parts, -1), w, b)
        assert kernels.linear(parts + parts[:1], w) is None  # widths do not add up to K
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("g, p, c", [(7, 64, 48), (3, 100, 48), (5, 13, 16), (2, 64, 24), (1, 5, 8)])
def test_channel_attention_with_its_projection(g, p, c):
    """The C kernel equals the paper's matrices, product and output projection."""
    from distillsr.models.asid import ChannelAttention
    torch.manual_seed(g * p + c)
    m = ChannelAttention(c, "meso")
    with torch.no_grad():
        m.temperature.fill_(1.7)
    q, k, v = (torch.randn(g, p, c) for _ in range(3))
    q[0, :, 1] = 0  # a channel with a zero norm (clamped to 1e-12)
    with torch.inference_mode():
        ref = (v @ m.matrices(q, k).transpose(1, 2)) @ m.project_out.weight.flatten(1).t()
        got = kernels.channel_attention(q, k, v, m.temperature.item(), m.project_out.weight)
        assert kernels.channel_attention(q[..., :4], k[..., :4], v[..., :4], 1.0, torch.randn(4, 4)) is None
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["image", "meso", "grid"])
@pytest.mark.parametrize("c", [48, 12])
def test_depthwise_conv_of_a_map_in_parts(layout, c):
    """``split=3`` gives what three convs of the channel thirds give (q, k, v of a qkv map)."""
    torch.manual_seed(c)
    x, w = torch.randn(1, 16, 24, 3 * c), torch.randn(3 * c, 1, 3, 3)
    with torch.inference_mode():
        parts = kernels.dwconv3x3(x, w, layout=layout, split=3)
        alone = [kernels.dwconv3x3(x[..., i * c:(i + 1) * c], w[i * c:(i + 1) * c], layout=layout)
                 for i in range(3)]
        with pytest.raises(ValueError, match="split"):
            kernels.dwconv3x3(x, w, bias=torch.zeros(3 * c), split=3)
        with pytest.raises(ValueError, match="split"):
            kernels.dwconv3x3(x[..., :3 * c - 1], w[:3 * c - 1], split=3)
    assert len(parts) == 3
    for got, ref in zip(parts, alone):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("c, n", [(48, 48), (36, 36), (12, 12), (24, 48)])
def test_gate_and_product_row_by_row(c, n):
    """``gate_linear`` gives what the gated depthwise conv and then the 1x1 conv give."""
    torch.manual_seed(c + n)
    h = torch.randn(1, 9, 21, 2 * c)
    w1, w2, wo = torch.randn(c, 1, 3, 3), torch.randn(c, 1, 3, 3), torch.randn(n, c, 1, 1) * 0.2
    res = torch.randn(1, 9, 21, n + 4)[..., 1:n + 1]  # a strided residual
    with torch.inference_mode():
        got = kernels.gate_linear(h[..., :c], w1, h[..., c:], w2, wo, add=res)
        g = kernels.dwconv3x3(h[..., :c], w1, act="gelu", gate=(h[..., c:], w2))
        steps = kernels.linear(g, wo.flatten(1), add=res)
        assert kernels.gate_linear(h[..., :c], w1, h[..., c:], w2, torch.randn(20, c)) is None
    assert torch.equal(got, steps)


@pytest.mark.parametrize("layout", ["image", "meso", "global"])
@pytest.mark.parametrize("k, n", [(48, 144), (36, 36), (12, 36), (24, 72)])
def test_layer_norm_taken_by_the_product(layout, k, n):
    """``norm_linear`` gives what the LayerNorm in token order and then the product give."""
    torch.manual_seed(k + n)
    x = torch.randn(1, 16, 24, k + 3)[..., 1:k + 1]
    norm = torch.nn.LayerNorm(k)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    w, b = torch.randn(n, k), torch.randn(n)
    with torch.inference_mode():
        got = kernels.norm_linear(x, norm, layout, w, b)
        steps = kernels.linear(kernels.layer_norm(x, norm, layout), w, b)
        ref = F.linear(norm(to_tokens(x, layout) if layout != "image" else x), w, b)
        assert kernels.norm_linear(x, norm, "grid", w) is None
    assert torch.equal(got, steps)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("s, h, w", [(2, 9, 21), (3, 8, 17), (4, 5, 8), (2, 1, 3)])
def test_upsampler_straight_into_the_cropped_image(s, h, w):
    """``upsample_conv`` is the 3x3 conv and pixel shuffle of NHWC features, cropped, and no
    further from the exact sum than PyTorch's NCHW conv."""
    torch.manual_seed(s * h * w)
    conv = torch.nn.Conv2d(48, 3 * s * s, 3, padding=1)
    x = torch.randn(2, h, w, 48 + 5)[..., 2:50]  # a strided map
    with torch.inference_mode():
        ref = F.pixel_shuffle(conv(x.permute(0, 3, 1, 2).contiguous()), s)
        exact = F.pixel_shuffle(F.conv2d(x.permute(0, 3, 1, 2).double(), conv.weight.double(),
                                         conv.bias.double(), padding=1), s)
        for oh, ow in [(h * s, w * s), (h * s - 1, w * s - 2)]:
            got = kernels.upsample_conv(x, conv, s, oh, ow)
            assert got.shape == (2, 3, oh, ow) and got.is_contiguous()
            torch.testing.assert_close(got, ref[..., :oh, :ow], atol=2e-6, rtol=0)
            err = (got.double() - exact[..., :oh, :ow]).abs().max()
            assert err <= max((ref.double() - exact).abs().max() * 1.5, 1e-7)
        assert kernels.upsample_conv(x, torch.nn.Conv2d(48, 12, 1), 2, 2 * h, 2 * w) is None


@pytest.mark.parametrize("d, shape", [(48, (1, 9, 21)), (36, (2, 7, 13)), (12, (1, 1, 5)), (24, (3, 16, 24))])
@pytest.mark.parametrize("threads", [1, 2])
def test_whole_gfn_row_by_row(d, shape, threads):
    """``gfn_rows`` gives exactly what the product, then ``gate_linear``, give, whatever bands
    the threads take (a band may start inside an image)."""
    torch.manual_seed(d)
    b, h, w = shape
    x = torch.randn(b, h, w, d + 3)[..., 1:d + 1]
    wi, wd, wo = torch.randn(2 * d, d, 1, 1) * 0.2, torch.randn(2 * d, 1, 3, 3), torch.randn(d, d, 1, 1) * 0.2
    res = torch.randn(b, h, w, d)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = kernels.gfn_rows(x, wi, wd, wo, add=res)
            hid = kernels.linear(x, wi.flatten(1))
            steps = kernels.gate_linear(hid[..., :d], wd[:d], hid[..., d:], wd[d:], wo, add=res)
            assert kernels.gfn_rows(x[..., :d - 4], wi, wd, wo) is None
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, steps)


@pytest.mark.parametrize("d, shape, layout", [(48, (1, 16, 24), "meso"), (48, (2, 16, 32), "grid"),
                                              (36, (1, 8, 16), "image"), (12, (3, 16, 16), "grid")])
@pytest.mark.parametrize("threads", [1, 2])
def test_channel_attention_inputs_row_by_row(d, shape, layout, threads):
    """``qkv_rows`` gives exactly what ``norm_linear`` and the split depthwise conv give."""
    torch.manual_seed(d)
    b, h, w = shape
    x = torch.randn(b, h, w, d + 3)[..., 1:d + 1]
    norm = torch.nn.LayerNorm(d)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    wq, wd = torch.randn(3 * d, d, 1, 1) * 0.2, torch.randn(3 * d, 1, 3, 3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = kernels.qkv_rows(x, norm, wq, wd, layout)
            steps = kernels.dwconv3x3(kernels.norm_linear(x, norm, "image", wq.flatten(1)), wd,
                                      layout=layout, split=3)
            assert kernels.qkv_rows(x, norm, wq, wd, "diagonal") is None
    finally:
        torch.set_num_threads(before)
    assert len(got) == 3 and all(torch.equal(a, s) for a, s in zip(got, steps))


@pytest.mark.parametrize("c, n, shape", [(3, 48, (1, 9, 21)), (48, 48, (2, 5, 8)), (16, 12, (1, 1, 3))])
def test_3x3_conv_as_a_product_over_its_taps(c, n, shape):
    """``conv3x3`` is the conv (padding 1, bias) of an NHWC map, no further from the exact sum
    than PyTorch's."""
    torch.manual_seed(c + n)
    b, h, w = shape
    conv = torch.nn.Conv2d(c, n, 3, padding=1)
    x = torch.randn(b, c, h, w).permute(0, 2, 3, 1)  # NHWC view of an NCHW tensor
    with torch.inference_mode():
        got = kernels.conv3x3(x, conv)
        ref = conv(x.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
        exact = F.conv2d(x.permute(0, 3, 1, 2).double(), conv.weight.double(), conv.bias.double(),
                         padding=1).permute(0, 2, 3, 1)
        assert kernels.conv3x3(x, torch.nn.Conv2d(c, n, 3, padding=1, stride=2)) is None
    assert got.shape == (b, h, w, n)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=0)
    assert (got.double() - exact).abs().max() <= max((ref.double() - exact).abs().max() * 1.5, 1e-7)
