"""Size and compute accounting of a (binary) ViT, in the spirit of ``larq.models.summary``.

``summary(model)`` walks the NNX module tree (``nnx.iter_modules``) and returns a
:class:`Summary`: one :class:`LayerRow` per layer plus totals; ``print_summary``
prints it as a table, ``compare(fp_model, binary_model)`` gives the savings.
Every layer reports its own parameters (bit width and category) and MACs (by
precision) through its ``report(num_tokens)`` method
(:class:`bvit_jax.nn.layer_report.LayerReport`); this module only adds the
reports up under each convention, and knows no layer class.
Abstract models work too (``nnx.eval_shape(lambda: create(...))``): only shapes
are read, nothing is allocated.

Parameters by precision
  1-bit: latent kernels that the forward binarizes (a ``BinaryLinear`` whose
  weight binarizer has precision 1); 32-bit: every other ``nnx.Param``. A 1-bit export must
  also store the per-output-channel weight scale ``alpha = mean|W|``; it is not
  a parameter (it is derived from the latent kernel) and is listed apart as
  "derived 32-bit scales".

Size: 1-bit values count 1/8 byte, everything else 4 bytes; ``MB = 1e6 bytes``.
Three conventions, each labelled wherever a figure is printed:

``full``
    every parameter of the model, plus the derived weight scales.
``fp-arch``
    every parameter the full-precision architecture has (patch embedding, class
    token, position embedding, all LayerNorms of DeiT, block kernels and biases,
    head), with the binarized kernels at 1 bit; the parameters that binarization
    adds (activation shifts beta/gamma, RPReLU, the shortcut LayerNorms or affines, the
    attention level ``c``, the derived weight scales) are left out.
``paper``
    for a binary model, only the 1-bit block kernels plus the patch embedding
    (kernel and bias), the head (kernel and bias) and the LayerNorms the fp model
    has, at 32 bits; position embedding, class token, block biases and all that
    binarization adds are left out. A full-precision model (the reference of
    every ratio) is counted in full. This reproduces the BinaryViT abstract's
    16.2x for DeiT-S (16.18x: 88.20 MB / 5.45 MB). Applying the same leave-outs
    to the fp model as well would give 86.18 MB / 5.45 MB = 16.09x.

Compute: multiply-accumulates (MACs) per image, the convention under which
DeiT-S has "4.6G FLOPs" (Touvron et al. 2021). Counted: patch embedding
``patches * k*k*Cin * D``; every linear ``tokens * in * out`` (tokens = N =
patches + 1); attention ``2 * heads * N*N*d`` (``Q K^T`` and ``P V``); the head
on the class token only, ``D * classes``. LayerNorm, softmax, activations,
shifts and scales are elementwise and, as in the standard convention, not
counted. A MAC is binary (a BOP) when both operands are binary: a
``BinaryLinear`` with binary weights and binary inputs, and both attention
matmuls when ``binary_attention`` (``Q_b K_b^T`` on +-1, ``P_b V_b`` on
{0, c} x +-1). Everything else is a full-precision MAC.

OPs = BOPs / 64 + FLOPs (Bi-Real Net, Liu et al. ECCV 2018; ReActNet), with
FLOPs counted as full-precision MACs. For DeiT-S this gives 35.6x with both
attention matmuls binary, 15.1x with one of them in full precision; the
BinaryViT abstract's 17.7x does not follow from this standard convention
(its counting is not published).

Published reference figures (asserted in ``tests/test_summary.py``): DeiT-T /
S / B have 5.72M / 22.05M / 86.57M parameters and 1.25 / 4.60 / 17.56 GMACs
(DeiT, Touvron et al. 2021, Table 1; timm).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flax import nnx

from bvit_jax.nn.layer_report import CATEGORIES, LayerReport, float_params_report

__all__ = [
    "CONVENTIONS",
    "OPS_CONVENTION",
    "LayerRow",
    "Summary",
    "Comparison",
    "summary",
    "print_summary",
    "compare",
    "size_accounting",
]

CONVENTIONS: dict[str, str] = {
    "paper": (
        "paper convention: 1-bit block kernels + fp32 patch embedding, head and the fp model's "
        "LayerNorms; pos embed, cls token, biases and everything binarization adds left out "
        "(an fp model is counted in full)"
    ),
    "fp-arch": (
        "fp-architecture count: every parameter the fp DeiT has (binarized kernels at 1 bit); "
        "what binarization adds (shifts, RPReLU, shortcut LNs, attn level c, weight scales) left out"
    ),
    "full": "full count: every parameter, plus the derived per-channel weight scales a 1-bit export stores",
}

OPS_CONVENTION = (
    "OPs = BOPs/64 + FLOPs, counted as MACs per image; binary = both operands binary "
    "(binary linears; both attention matmuls when binary_attention)"
)

_BYTES_PER_32BIT = 4.0
_BYTES_PER_1BIT = 1.0 / 8.0

# Parameter categories; which conventions count them (for binary models).
_COUNTED = {
    "binary_kernel": {"paper", "fp-arch", "full"},
    "linear_kernel": {"paper", "fp-arch", "full"},
    "patch_embed": {"paper", "fp-arch", "full"},
    "head": {"paper", "fp-arch", "full"},
    "norm": {"paper", "fp-arch", "full"},
    "other": {"paper", "fp-arch", "full"},  # unknown fp parameter: count it (conservative)
    "bias": {"fp-arch", "full"},
    "tokens": {"fp-arch", "full"},
    "added": {"full"},
}
if set(_COUNTED) != set(CATEGORIES):
    raise RuntimeError("summary: every parameter category of bvit_jax.nn.layer_report needs its conventions")

# Forward order of the known children (for the table); unknown names sort last.
_RANK = {
    "patch_embed": 0,
    "cls_token": 1,
    "pos_embed": 2,
    "blocks": 3,
    "head": 5,
    "norm1": 0,
    "attn": 1,
    "norm2": 2,
    "mlp": 3,
    "q": 0,
    "k": 1,
    "v": 2,
    "q_sign": 3,
    "k_sign": 4,
    "v_sign": 5,
    "context_norm": 6,
    "context_act": 6,
    "proj": 7,
    "fc1": 0,
    "act": 1,
    "fc2": 2,
    "linear": 0,
    "shift": 0,
    "norm": 4,
    "out_act": 5,
}


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """Accounting of one layer (a module that owns parameters or does MACs).

    Sizes are in bytes under each convention (see the module docstring);
    MACs are per image.
    """

    path: str
    kind: str
    params_1bit: int = 0
    params_32bit: int = 0
    derived_32bit: int = 0
    size_full: float = 0.0
    size_fp_arch: float = 0.0
    size_paper: float = 0.0
    binary_macs: int = 0
    fp_macs: int = 0

    @property
    def params(self) -> int:
        return self.params_1bit + self.params_32bit

    @property
    def ops(self) -> float:
        """``BOPs / 64 + FLOPs`` (MACs)."""
        return self.binary_macs / 64.0 + self.fp_macs

    def size(self, convention: str = "full") -> float:
        _check_convention(convention)
        return {"full": self.size_full, "fp-arch": self.size_fp_arch, "paper": self.size_paper}[convention]


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown size convention {convention!r}; choose one of {sorted(CONVENTIONS)}")


def _sum_rows(path: str, kind: str, rows) -> LayerRow:
    fields = [f.name for f in dataclasses.fields(LayerRow) if f.name not in ("path", "kind")]
    return LayerRow(path, kind, **{f: sum(getattr(r, f) for r in rows) for f in fields})


@dataclasses.dataclass(frozen=True)
class Summary:
    """Per-layer rows and totals of one model. ``str(summary)`` is the table."""

    name: str
    rows: tuple[LayerRow, ...]
    is_binary: bool
    image_size: int
    num_tokens: int
    attention_binary_macs: int  # BOPs of the two attention matmuls (for the one-FP-matmul variant)

    @property
    def total(self) -> LayerRow:
        return _sum_rows("total", "", self.rows)

    @property
    def params(self) -> int:
        return self.total.params

    @property
    def params_1bit(self) -> int:
        return self.total.params_1bit

    @property
    def params_32bit(self) -> int:
        return self.total.params_32bit

    @property
    def derived_32bit(self) -> int:
        return self.total.derived_32bit

    @property
    def binary_macs(self) -> int:
        return self.total.binary_macs

    @property
    def fp_macs(self) -> int:
        return self.total.fp_macs

    @property
    def macs(self) -> int:
        return self.binary_macs + self.fp_macs

    @property
    def ops(self) -> float:
        """``BOPs/64 + FLOPs`` in MACs, both attention matmuls binary when the model has binary attention."""
        return self.total.ops

    @property
    def ops_one_fp_attention_matmul(self) -> float:
        """OPs if one of the two attention matmuls were full precision (the other binary)."""
        half = self.attention_binary_macs / 2.0
        return self.ops - half / 64.0 + half

    def size_bytes(self, convention: str = "full") -> float:
        """Model size in bytes under ``convention`` (``'full'``, ``'fp-arch'`` or ``'paper'``)."""
        return self.total.size(convention)

    def as_dict(self) -> dict[str, Any]:
        """Totals as a flat dict of numbers (for logging)."""
        return {
            "params": self.params,
            "params_1bit": self.params_1bit,
            "params_32bit": self.params_32bit,
            "derived_32bit": self.derived_32bit,
            "size_bytes_full": self.size_bytes("full"),
            "size_bytes_fp_arch": self.size_bytes("fp-arch"),
            "size_bytes_paper": self.size_bytes("paper"),
            "binary_macs": self.binary_macs,
            "fp_macs": self.fp_macs,
            "ops": self.ops,
        }

    def table(self, depth: int | None = None) -> str:
        """The table; ``depth=k`` merges rows by the first ``k`` path components
        (e.g. ``depth=2`` gives one row per block)."""
        rows = self.rows
        if depth is not None:
            groups: dict[str, list[LayerRow]] = {}
            for r in rows:
                key = "/".join(r.path.split("/")[:depth]) if r.path else r.path
                groups.setdefault(key, []).append(r)
            rows = tuple(g[0] if len(g) == 1 else _sum_rows(k, f"{len(g)} layers", g) for k, g in groups.items())
        head = ("Layer", "Type", "1-bit params", "32-bit params", "Full kB", "Paper kB", "Binary MMACs", "FP MMACs")
        body = [
            (
                r.path or "(root)",
                r.kind,
                f"{r.params_1bit:,}",
                f"{r.params_32bit:,}",
                f"{r.size_full / 1e3:,.2f}",
                f"{r.size_paper / 1e3:,.2f}",
                f"{r.binary_macs / 1e6:,.3f}",
                f"{r.fp_macs / 1e6:,.3f}",
            )
            for r in rows
        ]
        t = self.total
        total_line = (
            "Total",
            "",
            f"{t.params_1bit:,}",
            f"{t.params_32bit:,}",
            f"{t.size_full / 1e3:,.2f}",
            f"{t.size_paper / 1e3:,.2f}",
            f"{t.binary_macs / 1e6:,.3f}",
            f"{t.fp_macs / 1e6:,.3f}",
        )
        widths = [max(len(str(x[i])) for x in [head, total_line, *body]) for i in range(len(head))]

        def fmt(cells):
            return "  ".join(
                str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )

        rule = "-" * len(fmt(head))
        lines = [f"{self.name} ({self.image_size}px, {self.num_tokens} tokens; MACs per image)", rule, fmt(head), rule]
        lines += [fmt(b) for b in body]
        lines += [rule, fmt(total_line), rule]
        lines += [
            f"Parameters: {self.params:,} ({self.params_1bit:,} 1-bit, {self.params_32bit:,} 32-bit)"
            + (f"; plus {self.derived_32bit:,} derived 32-bit weight scales" if self.derived_32bit else ""),
            "Size (1-bit = 1/8 byte, else 4 bytes; MB = 1e6 bytes):",
        ]
        for conv in ("full", "fp-arch", "paper"):
            lines.append(f"  {self.size_bytes(conv) / 1e6:9.3f} MB  {CONVENTIONS[conv]}")
        lines += [
            f"MACs: {self.binary_macs / 1e9:.3f} G binary + {self.fp_macs / 1e9:.3f} G full precision"
            f" = {self.macs / 1e9:.3f} G",
            f"OPs: {self.ops / 1e9:.4f} G  ({OPS_CONVENTION})",
        ]
        if self.attention_binary_macs:
            lines.append(
                f"     {self.ops_one_fp_attention_matmul / 1e9:.4f} G  if one attention matmul were full precision"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _path_key(path: tuple) -> tuple:
    return tuple((c, "") if isinstance(c, int) else (_RANK.get(str(c), 50), str(c)) for c in path)


def _report(module: nnx.Module, num_tokens: int) -> LayerReport:
    """The module's own report, or, for a module that has none, its parameters at 32 bits as ``'other'``."""
    return module.report(num_tokens) if hasattr(module, "report") else float_params_report(module, "other")


def summary(model: nnx.Module, name: str | None = None) -> Summary:
    """Account for ``model`` (a :class:`bvit_jax.nn.models.VisionTransformer`, concrete or abstract).

    Each module reports its own parameters and MACs
    (:class:`bvit_jax.nn.layer_report.LayerReport`); see the module docstring for
    the counting rules and the size conventions.
    """
    cfg = getattr(model, "cfg", None)
    opts = getattr(model, "opts", None)
    if cfg is None or opts is None:
        raise TypeError("summary() needs a VisionTransformer (a module with .cfg (ViTConfig) and .opts)")
    n_tok = cfg.num_tokens
    is_binary = bool(opts.is_binary)

    modules = {tuple(p): m for p, m in nnx.iter_modules(model)}
    sizes: dict[tuple, dict[str, int]] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        sizes.setdefault(tuple(path[:-1]), {})[str(path[-1])] = int(math.prod(var.shape))

    rows = []
    attn_bin = 0
    for path in sorted(modules, key=_path_key):
        report = _report(modules[path], n_tok)
        own = sizes.get(path, {})
        if set(own) != set(report.params):
            raise ValueError(
                f"the report of {'/'.join(map(str, path)) or 'the model'} names the parameters "
                f"{sorted(report.params)}, the module owns {sorted(own)}"
            )
        r = dict(
            params_1bit=0,
            params_32bit=0,
            derived_32bit=report.derived_32bit,
            size_full=report.derived_32bit * _BYTES_PER_32BIT,
            size_fp_arch=0.0,
            size_paper=0.0,
            binary_macs=report.binary_macs,
            fp_macs=report.fp_macs,
        )
        for pname, param in report.params.items():
            n = own[pname]
            one_bit = param.bits == 1
            r["params_1bit" if one_bit else "params_32bit"] += n
            nbytes = n * (_BYTES_PER_1BIT if one_bit else _BYTES_PER_32BIT)
            r["size_full"] += nbytes
            r["size_fp_arch"] += nbytes if "fp-arch" in _COUNTED[param.category] else 0.0
            r["size_paper"] += nbytes if (not is_binary or "paper" in _COUNTED[param.category]) else 0.0
        attn_bin += report.attention_binary_macs
        if not any(v for k, v in r.items()):
            continue
        rows.append(LayerRow("/".join(str(c) for c in path), report.kind, **r))
    return Summary(
        name=name
        or f"{type(model).__name__} (embed {cfg.embed_dim}, depth {cfg.depth}, "
        f"{'binary' if is_binary else 'full precision'})",
        rows=tuple(rows),
        is_binary=is_binary,
        image_size=cfg.image_size,
        num_tokens=n_tok,
        attention_binary_macs=attn_bin,
    )


def print_summary(model: nnx.Module, depth: int | None = None, name: str | None = None) -> Summary:
    """Print the summary table of ``model`` (``depth`` merges rows, see :meth:`Summary.table`)."""
    s = summary(model, name=name)
    print(s.table(depth=depth))
    return s


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Savings of a binary model over its full-precision reference, each with its convention.

    ``size_ratio[conv] = fp.size_bytes(conv) / binary.size_bytes(conv)`` (an fp
    model counts the same under every convention, so the reference is always
    its full size); ``ops_ratio = fp.ops / binary.ops`` under
    :data:`OPS_CONVENTION`; ``ops_ratio_one_fp_attention_matmul`` the same with
    one attention matmul in full precision.
    """

    fp: Summary
    binary: Summary
    size_ratio: dict[str, float]
    ops_ratio: float
    ops_ratio_one_fp_attention_matmul: float
    conventions: dict[str, str]

    def as_dict(self) -> dict[str, float]:
        out = {f"size_ratio_{k.replace('-', '_')}": v for k, v in self.size_ratio.items()}
        out["ops_ratio"] = self.ops_ratio
        out["ops_ratio_one_fp_attention_matmul"] = self.ops_ratio_one_fp_attention_matmul
        return out

    def table(self) -> str:
        lines = [f"{self.binary.name} vs {self.fp.name}"]
        for conv in ("paper", "fp-arch", "full"):
            lines.append(
                f"  size {self.size_ratio[conv]:6.2f}x  ({self.fp.size_bytes(conv) / 1e6:.2f} MB -> "
                f"{self.binary.size_bytes(conv) / 1e6:.2f} MB)  {self.conventions[conv]}"
            )
        lines.append(
            f"  OPs  {self.ops_ratio:6.2f}x  ({self.fp.ops / 1e9:.3f} G -> {self.binary.ops / 1e9:.4f} G)  "
            f"{self.conventions['ops']}"
        )
        lines.append(
            f"  OPs  {self.ops_ratio_one_fp_attention_matmul:6.2f}x  {self.conventions['ops_one_fp_attention_matmul']}"
        )
        lines.append(f"  note: {self.conventions['note']}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def compare(fp_model, binary_model) -> Comparison:
    """Size and OPs ratios of ``binary_model`` over ``fp_model`` (models or :class:`Summary`)."""
    fp = fp_model if isinstance(fp_model, Summary) else summary(fp_model)
    bn = binary_model if isinstance(binary_model, Summary) else summary(binary_model)
    if fp.is_binary:
        raise ValueError("compare(): the reference model must be full precision (preset 'fp')")
    size_ratio = {c: fp.size_bytes(c) / bn.size_bytes(c) for c in ("paper", "fp-arch", "full")}
    conventions = dict(CONVENTIONS)
    conventions["ops"] = OPS_CONVENTION + (
        " (both attention matmuls binary)" if bn.attention_binary_macs else " (attention matmuls full precision)"
    )
    conventions["ops_one_fp_attention_matmul"] = "same, but one of the two attention matmuls full precision"
    conventions["note"] = (
        "the BinaryViT abstract's 17.7x OPs saving does not follow from the standard convention "
        "(35.6x / 15.1x for DeiT-S); its counting is not published"
    )
    return Comparison(
        fp=fp,
        binary=bn,
        size_ratio=size_ratio,
        ops_ratio=fp.ops / bn.ops,
        ops_ratio_one_fp_attention_matmul=fp.ops / bn.ops_one_fp_attention_matmul,
        conventions=conventions,
    )


def size_accounting(model: nnx.Module) -> dict[str, float]:
    """What :mod:`bvit_jax.nn.summary` says the 1-bit model should weigh, to set a file against.

    Works on a real or an abstract (``nnx.eval_shape``) model. Returns
    ``params``, ``binary_params`` (latent binary kernels), ``full_bytes``,
    ``fp_arch_bytes`` and ``paper_bytes`` (the summary's three labelled
    conventions; ``full`` includes the derived per-channel scales ``alpha`` a
    1-bit export stores), ``fp32_bytes`` (this model's parameters all in
    float32: what its checkpoint holds, besides a BatchNorm's running statistics) and ``fp_model_bytes`` (the
    full-precision model of the same architecture, preset ``fp``: the reference
    of the paper's 16.2x).
    """
    s = summary(model)
    # the same model class with default options (every binarization switch off): the fp model
    fp = summary(nnx.eval_shape(lambda: type(model)(model.cfg, type(model.opts)(), rngs=nnx.Rngs(0))))
    return {
        "params": s.params,
        "binary_params": s.params_1bit,
        "fp32_bytes": 4.0 * s.params,
        "full_bytes": s.size_bytes("full"),
        "fp_arch_bytes": s.size_bytes("fp-arch"),
        "paper_bytes": s.size_bytes("paper"),
        "fp_model_bytes": fp.size_bytes("full"),
    }
