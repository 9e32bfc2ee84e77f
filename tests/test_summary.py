"""Accounting against published figures (DeiT, Touvron et al. 2021; BinaryViT abstract).

Models are built abstractly with ``nnx.eval_shape`` (no parameter memory).
"""

import functools
import math

import jax
import pytest
from flax import nnx

from bvit_jax.nn import summary as S
from bvit_jax.nn.models import create
from bvit_jax.nn.param_groups import latent_weight_mask


@functools.cache
def abstract(variant, preset):
    return nnx.eval_shape(lambda: create(variant, preset))


@functools.cache
def summ(variant, preset):
    return S.summary(abstract(variant, preset))


# Published: DeiT Table 1 / timm (params), DeiT "FLOPs" (= MACs).
@pytest.mark.parametrize(
    "variant,params_m,gmacs",
    [("deit_tiny", 5.72, 1.25), ("deit_small", 22.05, 4.60), ("deit_base", 86.57, 17.56)],
)
def test_deit_published_params_and_macs(variant, params_m, gmacs):
    s = summ(variant, "fp")
    assert round(s.params / 1e6, 2) == params_m
    assert round(s.macs / 1e9, 2) == gmacs
    assert s.binary_macs == 0 and s.params_1bit == 0
    # the three size conventions agree on an fp model: 4 bytes per parameter
    for conv in S.CONVENTIONS:
        assert s.size_bytes(conv) == 4 * s.params


def test_deit_small_breakdown_from_design():
    """DESIGN: 48 encoder linears hold 21.23M params and 4.18 GMAC; attention matmuls 0.36 GMAC."""
    b = summ("deit_small", "binaryvit")
    assert round(b.params_1bit / 1e6, 2) == 21.23
    lin_bmacs = sum(r.binary_macs for r in b.rows if r.kind.startswith("BinaryLinear"))
    # timm's 48 (fused qkv, proj, fc1, fc2 per block) are 72 here: q, k, v are separate layers
    assert sum(r.kind.startswith("BinaryLinear") for r in b.rows) == 72
    assert round(lin_bmacs / 1e9, 2) == 4.18
    assert round(b.attention_binary_macs / 1e9, 2) == 0.36
    # binarization moves MACs between precisions, it does not add any
    assert b.macs == summ("deit_small", "fp").macs


def test_size_ratio_paper_convention_reproduces_16_18():
    c = S.compare(summ("deit_small", "fp"), summ("deit_small", "binaryvit"))
    assert c.size_ratio["paper"] == pytest.approx(16.18, abs=0.02)
    assert "paper convention" in c.conventions["paper"]


def test_size_ratio_full_counts_are_lower():
    c = S.compare(summ("deit_small", "fp"), summ("deit_small", "binaryvit"))
    # DESIGN's 14.5-15.5x: every parameter of the DeiT architecture, binarization additions left out
    assert 14.5 <= c.size_ratio["fp-arch"] <= 15.5
    assert c.size_ratio["fp-arch"] < c.size_ratio["paper"]
    # every parameter (incl. shifts, RPReLU, shortcut LNs, c, weight scales): lower still
    assert c.size_ratio["full"] < c.size_ratio["fp-arch"]


@pytest.mark.parametrize("switch", [None, "rprelu_everywhere", "attention_bypass"])
def test_full_count_matches_an_independent_count(switch):
    """Full count = latent kernels at 1 bit + every other Param at 32 bits + one 32-bit alpha per output channel
    (also with each of Le & Li's switches, whose RPReLUs and LayerNorm are 32-bit parameters the count finds)."""
    model = (
        abstract("vit_micro_32", "binaryvit")
        if switch is None
        else nnx.eval_shape(lambda: create("vit_micro_32", "binaryvit", **{switch: True}))
    )
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = latent_weight_mask(model, params)
    leaves, masks = jax.tree.leaves(params), jax.tree.leaves(mask)
    bits = sum(math.prod(p.shape) * (1 if m else 32) for p, m in zip(leaves, masks))
    alphas = sum(p.shape[-1] for p, m in zip(leaves, masks) if m)
    s = S.summary(model)
    assert s.size_bytes("full") == pytest.approx(bits / 8 + 4 * alphas)
    assert s.params == sum(math.prod(p.shape) for p in leaves)
    assert s.params_1bit == sum(math.prod(p.shape) for p, m in zip(leaves, masks) if m)
    assert s.derived_32bit == alphas


def test_ops_ratio_conventions():
    c = S.compare(summ("deit_small", "fp"), summ("deit_small", "binaryvit"))
    assert c.ops_ratio == pytest.approx(35.6, abs=0.05)  # both attention matmuls binary
    assert c.ops_ratio_one_fp_attention_matmul == pytest.approx(15.1, abs=0.05)
    assert "both attention matmuls binary" in c.conventions["ops"]
    assert "17.7" in c.conventions["note"]


def _nano_hand_counts():
    """MACs per image of vit_nano, by hand from its shapes (models.VARIANTS): 16 px images, 4 px
    patches, 3 channels, embed 32, depth 2, 2 heads (head width 16), MLP ratio 4, 10 classes."""
    patches = (16 // 4) ** 2  # 16
    n = patches + 1  # 17 tokens with the class token
    d, hidden, heads, hd, depth, classes = 32, 4 * 32, 2, 32 // 2, 2, 10
    patch_embed = patches * (4 * 4 * 3) * d  # a 4x4x3 -> 32 conv at each of 16 positions: 24,576
    qkv_proj = 4 * n * d * d  # q, k, v, proj: 17 tokens x 32 x 32 each: 69,632
    fc1 = n * d * hidden  # 17 x 32 x 128: 69,632
    fc2 = n * hidden * d  # 17 x 128 x 32: 69,632
    attention = 2 * heads * n * n * hd  # Q K^T and P V, per head 17 x 17 x 16 each: 18,496
    head = d * classes  # class token only: 320
    linears = depth * (qkv_proj + fc1 + fc2)  # 417,792
    return {"patch_embed": patch_embed, "linears": linears, "attention": depth * attention, "head": head}


def test_macs_and_ops_against_hand_counts():
    h = _nano_hand_counts()
    assert h == {"patch_embed": 24_576, "linears": 417_792, "attention": 36_992, "head": 320}
    fp = S.summary(abstract("vit_nano", "fp"))
    assert fp.binary_macs == 0
    assert fp.fp_macs == 24_576 + 417_792 + 36_992 + 320 == 479_680
    assert fp.ops == 479_680
    # binaryvit: block linears (binary weights and inputs) and both attention matmuls are BOPs;
    # patch embedding and head stay full precision.
    b = S.summary(abstract("vit_nano", "binaryvit"))
    assert b.binary_macs == 417_792 + 36_992 == 454_784
    assert b.attention_binary_macs == 36_992
    assert b.fp_macs == 24_576 + 320 == 24_896
    assert b.ops == 454_784 / 64 + 24_896 == 32_002  # OPs = BOPs / 64 + FLOPs
    # real-valued attention: its 36,992 MACs move back to full precision
    r = S.summary(nnx.eval_shape(lambda: create("vit_nano", "baseline", binary_attention=False)))
    assert (r.binary_macs, r.fp_macs) == (417_792, 24_896 + 36_992)
    assert r.ops == 417_792 / 64 + 61_888 == 68_416
    # per row: every q linear 17 x 32 x 32 = 17,408 BOPs, the patch embedding 24,576 MACs
    rows = {row.path: row for row in b.rows}
    assert rows["blocks/0/attn/q/linear"].binary_macs == 17_408
    assert rows["patch_embed"].fp_macs == 24_576 and rows["head"].fp_macs == 320


def test_attention_precision_follows_options():
    m = nnx.eval_shape(lambda: create("deit_small", "baseline", binary_attention=False))
    s = S.summary(m)
    assert s.attention_binary_macs == 0
    fp_attn = sum(r.fp_macs for r in s.rows if r.kind.startswith("Attention"))
    assert round(fp_attn / 1e9, 2) == 0.36
    # weights binary but inputs real: no BOPs from that linear
    m2 = nnx.eval_shape(lambda: create("vit_nano", "fp", binarize_weights=True))
    s2 = S.summary(m2)
    assert s2.binary_macs == 0 and s2.params_1bit > 0


def test_abstract_and_concrete_models_agree():
    concrete = S.summary(create("vit_nano", "binaryvit"))
    abstract_ = S.summary(nnx.eval_shape(lambda: create("vit_nano", "binaryvit")))
    assert concrete.rows == abstract_.rows
    leaf = jax.tree.leaves(nnx.state(abstract("vit_nano", "binaryvit"), nnx.Param))[0]
    assert isinstance(leaf, jax.ShapeDtypeStruct)  # really abstract


def test_table_and_data():
    s = summ("deit_small", "binaryvit")
    text = s.table()
    for label in ("paper convention", "full count", "fp-architecture count", "BOPs/64"):
        assert label in text
    assert "blocks/11/mlp/fc2/linear" in text
    grouped = s.table(depth=2)
    assert "blocks/0 " in grouped and "blocks/0/attn" not in grouped
    d = s.as_dict()
    assert d["params"] == s.params and d["size_bytes_paper"] == s.size_bytes("paper")
    c = S.compare(summ("deit_small", "fp"), s)
    assert "16.18x" in c.table()
    with pytest.raises(ValueError, match="convention"):
        s.size_bytes("bogus")
    with pytest.raises(ValueError, match="full precision"):
        S.compare(s, s)


def test_print_summary(capsys):
    s = S.print_summary(abstract("vit_nano", "binaryvit"))
    out = capsys.readouterr().out
    assert "Total" in out and isinstance(s, S.Summary)
    assert s.ops == 32_002  # test_macs_and_ops_against_hand_counts


def test_affine_branch_norm_counts_as_the_shortcut_layernorm_it_replaces():
    """``branch_norm='affine'`` has the same per-channel scale and bias as the shortcut LayerNorm, counted alike
    (binarization additions: in ``full`` only), and the same MACs."""
    ln = S.summary(abstract("vit_micro_32", "binaryvit"))
    model = nnx.eval_shape(lambda: create("vit_micro_32", "binaryvit", branch_norm="affine"))
    af = S.summary(model)
    assert af.params == ln.params and af.params_1bit == ln.params_1bit and af.macs == ln.macs
    for conv in ("full", "fp-arch", "paper"):
        assert af.size_bytes(conv) == ln.size_bytes(conv), conv
    assert "BranchAffine" in af.table()
