"""Packed (XNOR-popcount) inference vs the training-time forward, on this CPU.

Run (not a test; takes several minutes on 2 cores)::

    nice -n 10 .venv/bin/python benchmarks/packed_inference.py [--variants=deit_tiny,deit_small] [--batches=1,8] \
        [--branch_norms=layernorm,batchnorm,affine] [--isas=avx512,avx2,portable | --isas=none] [--min_time=2]

Prints markdown tables (the ones in ``docs/export.md``):

1. End to end, per variant and batch: the ``binaryvit`` model's training-time
   forward ``model(x)`` under ``jax.jit`` in float32 and in bfloat16 (latent
   float weights, binarized on the fly, float matmuls) vs
   :func:`bvit_jax.deploy.packed.packed_forward` on its XLA path
   (``backend="xla"``: XLA popcount linears and binary attention; also with the
   attention matmuls left in float) and on the native runtime
   (``backend="native"``, :mod:`bvit_jax.deploy.native`) at each kernel level
   (ISA) this CPU runs, with each packed contender's speed-up over float32
   (``fp32 ms / packed ms``), the max |logit| difference packed vs float32, and
   the max |logit| difference native vs the XLA packed path (must be 0: bit for
   bit). ``--branch_norms`` (default ``layernorm``) lists the shortcut-branch
   normalisations to measure (``model.branch_norm``: ``layernorm``,
   ``batchnorm``, ``affine``), side by side in one run; with more than one, a
   last table gives each one's packed time as a ratio to the first's.
2. The linear layers alone at DeiT-S shapes (dim 384, hidden 1536, 197 tokens
   per image): fp32 and bf16 ``x @ W`` vs the XLA popcount matmul on packed
   words (:func:`bvit_jax.deploy.bitops.packed_matmul`) and the whole XLA
   packed linear (shift, sign + pack of the activation, popcount matmul,
   ``alpha``, bias); then, per ISA, the native popcount matmul
   (:func:`bvit_jax.deploy.native.matmul`, same packed words) and the native
   fused linear (the shift in XLA, then :func:`bvit_jax.deploy.native.sign_matmul`:
   sign, pack, popcount matmul, ``alpha``, bias), each with its speed-up over
   fp32 and its binary MACs per cycle per core, ``M*K*N / (time * clock * cores)``,
   ``clock`` the nominal clock ``/proc/cpuinfo`` reports ("cpu MHz", not the
   turbo clock the core actually runs at), ``cores`` the native kernels'
   threads (:func:`bvit_jax.deploy.native.num_threads`, ``BVIT_NATIVE_THREADS``).
3. The file sizes vs the accounting (full count and paper convention).

All contenders of a row are timed in one :func:`time_interleaved` call
(round-robin); times are medians of repeated calls after a warm-up
(compilation excluded). ``--isas`` (default: every level this CPU runs, from
:func:`bvit_jax.deploy.native.best_isa` down) picks the native levels;
``none`` (or a machine where the library does not load: one line says why)
leaves only the XLA columns. ``packed_forward`` takes no ISA argument: it reads
``$BVIT_NATIVE_ISA`` on every call (a static argument of its jitted forward, so
each level is its own compiled function), which this script sets around each
native call.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bvit_jax import cli  # noqa: E402
from bvit_jax.deploy import native  # noqa: E402
from bvit_jax.deploy.bitops import pack_planes, packed_matmul  # noqa: E402
from bvit_jax.deploy.export import export_model, pack_model  # noqa: E402
from bvit_jax.deploy.latency import time_interleaved  # noqa: E402
from bvit_jax.deploy.packed import packed_forward  # noqa: E402
from bvit_jax.errors import UserError  # noqa: E402
from bvit_jax.nn.models import create  # noqa: E402
from bvit_jax.nn.options import BRANCH_NORMS  # noqa: E402
from bvit_jax.nn.summary import size_accounting  # noqa: E402


def perturb(model, seed=1, scale=0.1):
    """Move every parameter (and BatchNorm statistic) off its initial value, as training does (see ``end_to_end``).

    Positive scalars (attention levels) and BatchNorm variances are scaled, everything else shifted.
    """
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    leaves, treedef = jax.tree.flatten_with_path(state)
    new = []
    for i, (path, leaf) in enumerate(leaves):
        k = jax.random.fold_in(jax.random.key(seed), i)
        if leaf.ndim == 0 or "['var']" in jax.tree_util.keystr(path):
            new.append(leaf * (1 + 0.3 * jax.random.uniform(k, leaf.shape)))
        else:
            new.append(leaf + scale * jax.random.normal(k, leaf.shape))
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def jit_model(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, x):
        return nnx.merge(graphdef, state)(x)

    return lambda x: fwd(state, x)


def native_isas(requested=None):
    """The native levels to time, best first, and why there are none (or None).

    ``requested``: None or empty: every level this CPU runs (``native.ISAS`` up
    to :func:`bvit_jax.deploy.native.best_isa`); ``["none"]``: none; else those
    named (UserError for one the CPU lacks).
    """
    if requested == ["none"]:
        return [], "--isas=none"
    if jax.default_backend() != "cpu":
        return [], f"the native kernels run on the CPU only; JAX's default backend is {jax.default_backend()!r}"
    if not native.available():
        return [], f"the native library is unavailable: {native.load_error()}"
    runnable = native.ISAS[: native.ISAS.index(native.best_isa()) + 1][::-1]
    if not requested:
        return list(runnable), None
    bad = [i for i in requested if i not in runnable]
    if bad:
        raise UserError(f"--isas: {bad} not among the levels this CPU runs {list(runnable)}")
    return list(requested), None


@contextlib.contextmanager
def _isa_env(isa):
    """``$BVIT_NATIVE_ISA`` set to ``isa`` for the block (how ``packed_forward`` picks its native level)."""
    old = os.environ.get("BVIT_NATIVE_ISA")
    os.environ["BVIT_NATIVE_ISA"] = isa
    try:
        yield
    finally:
        if old is None:
            del os.environ["BVIT_NATIVE_ISA"]
        else:
            os.environ["BVIT_NATIVE_ISA"] = old


def native_forward(packed, isa):
    """``x -> packed_forward(packed, x, backend="native")`` at native level ``isa``."""

    def fwd(x):
        with _isa_env(isa):
            return packed_forward(packed, x, backend="native")

    return fwd


def end_to_end(variants, batches, min_time, branch_norms=("layernorm",), isas=()):
    """Rows ``(variant, bn, batch, {contender: ms}, max|packed - fp32|, top-1 agreement, {isa: max|native - xla|})``."""
    rows = []
    for variant, bn in ((v, bn) for v in variants for bn in branch_norms):
        # Perturbed like a trained model (a fresh one has every shift exactly 0, an
        # untypical case; docs/export.md, "Exactness").
        model = perturb(create(variant, "binaryvit", branch_norm=bn))
        model_bf16 = create(variant, "binaryvit", dtype=jnp.bfloat16, branch_norm=bn)
        nnx.update(model_bf16, nnx.state(model))  # parameters and BatchNorm statistics
        packed = pack_model(model)
        f32, bf16 = jit_model(model), jit_model(model_bf16)
        nat = {isa: native_forward(packed, isa) for isa in isas}
        cfg = model.cfg
        for b in batches:
            x = jax.random.normal(jax.random.key(b), (b, cfg.image_size, cfg.image_size, cfg.in_channels))
            ref, xla = f32(x), packed_forward(packed, x, backend="xla")
            diff = float(jnp.max(jnp.abs(xla - ref)))
            agree = float(jnp.mean(jnp.argmax(xla, -1) == jnp.argmax(ref, -1)))
            ndiff = {isa: float(jnp.max(jnp.abs(f(x) - xla))) for isa, f in nat.items()}
            fns = {
                "fp32": lambda: f32(x),
                "bf16": lambda: bf16(x),
                "packed": lambda: packed_forward(packed, x, backend="xla"),
                "packed_float_attn": lambda: packed_forward(packed, x, attention="float", backend="xla"),
            }
            fns.update({f"native_{isa}": functools.partial(f, x) for isa, f in nat.items()})
            t = time_interleaved(fns, min_time=min_time)
            rows.append((variant, bn, b, t, diff, agree, ndiff))
            nat_s = "".join(
                f", native {isa} {t[f'native_{isa}']:.2f} ms ({t['fp32'] / t[f'native_{isa}']:.1f}x fp32, "
                f"max|d| vs xla {ndiff[isa]:.1e})"
                for isa in nat
            )
            print(
                f"  {variant} ({bn}) b={b}: fp32 {t['fp32']:.2f} ms, bf16 {t['bf16']:.2f} ms, "
                f"packed xla {t['packed']:.2f} ms (float attention {t['packed_float_attn']:.2f} ms){nat_s}, "
                f"max|dlogit| {diff:.2e}, top-1 agreement {agree:.2f}",
                flush=True,
            )
    return rows


def cpu_clock_hz():
    """The first ``cpu MHz`` of ``/proc/cpuinfo`` in Hz (the reported/nominal clock), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return 1e6 * float(line.split(":")[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def linear_layers(batches, min_time, dim=384, hidden=1536, tokens=197, isas=()):
    """Rows ``(M, K, N, {contender: ms}, exact)``.

    ``exact``: every popcount contender (XLA and native) equals the float ``sign(x) @ W``.
    """
    rows = []
    rng = np.random.default_rng(0)
    fp32_mm = jax.jit(lambda x, w: x @ w)
    bf16_mm = jax.jit(lambda x, w: x @ w)
    popc = jax.jit(packed_matmul, static_argnums=2)

    @jax.jit
    def packed_linear(x, shift, words, alpha, bias, live):
        """sign + pack of the activation, popcount matmul, alpha and bias (as in packed_forward)."""
        return packed_matmul(
            pack_planes(x - shift),
            words,
            x.shape[-1],
            live=live,
            epilogue=lambda acc, a, b: acc.astype(jnp.float32) * a + b,
            epilogue_args=(alpha, bias),
        )

    @functools.partial(jax.jit, static_argnames=("n", "isa"))
    def native_popc(xw, words, n, isa):
        return native.matmul(xw, words, n, isa=isa)

    @functools.partial(jax.jit, static_argnames="isa")
    def native_linear(x, shift, words, alpha, bias, isa):
        """The shift in XLA, then one native call: sign, pack, popcount matmul, alpha and bias (as packed_forward)."""
        return native.sign_matmul(x - shift, words, alpha, bias, mode="fma", isa=isa)

    live = np.bool_(True)

    for b in batches:
        m = b * tokens
        for k, n in ((dim, dim), (dim, hidden), (hidden, dim)):
            x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
            w = jnp.asarray(np.where(rng.standard_normal((k, n)) >= 0, 1.0, -1.0).astype(np.float32))
            words = pack_planes(w.T).T  # (k/32, n)
            xw = pack_planes(x)
            shift, alpha, bias = jnp.zeros((k,)), jnp.ones((n,)), jnp.zeros((n,))
            want = (jnp.where(x >= 0, 1.0, -1.0) @ w).astype(jnp.int32)
            ok = bool(jnp.all(popc(xw, words, k) == want))
            for isa in isas:
                ok &= bool(jnp.all(native_popc(xw, words, k, isa) == want))
                ok &= bool(jnp.all(native_linear(x, shift, words, alpha, bias, isa) == want.astype(jnp.float32)))
            x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
            fns = {
                "fp32": lambda: fp32_mm(x, w),
                "bf16": lambda: bf16_mm(x16, w16),
                "popc": lambda: popc(xw, words, k),
                "linear": lambda: packed_linear(x, shift, words, alpha, bias, live),
            }
            for isa in isas:
                fns[f"native_popc_{isa}"] = functools.partial(native_popc, xw, words, k, isa)
                fns[f"native_linear_{isa}"] = functools.partial(native_linear, x, shift, words, alpha, bias, isa)
            t = time_interleaved(fns, min_time=min_time)
            rows.append((m, k, n, t, ok))
            nat_s = "".join(
                f", native {isa} popcount {t[f'native_popc_{isa}']:.3f} linear {t[f'native_linear_{isa}']:.3f}"
                for isa in isas
            )
            print(
                f"  M={m} K={k} N={n}: fp32 {t['fp32']:.3f} ms, bf16 {t['bf16']:.3f}, popcount {t['popc']:.3f}, "
                f"packed linear {t['linear']:.3f}{nat_s} (exact: {ok})",
                flush=True,
            )
    return rows


def sizes(variants):
    rows = []
    for variant in variants:
        model = create(variant, "binaryvit")
        acc = size_accounting(model)
        rows.append((variant, len(export_model(model, data=None)), acc))
    return rows


def _define_flags(fv, argv: list[str]) -> None:
    del argv
    from absl import flags

    flags.DEFINE_list("variants", "deit_tiny,deit_small", "Comma-separated model variants.", flag_values=fv)
    flags.DEFINE_list(
        "batches",
        "1,8",
        "Comma-separated batch sizes (end to end; M = batch x 197 tokens for the linears).",
        flag_values=fv,
    )
    flags.DEFINE_float("min_time", 2.0, "Seconds of timed calls per measurement.", flag_values=fv)
    flags.DEFINE_bool("sizes_only", False, "Only the size table (no timing).", flag_values=fv)
    flags.DEFINE_list(
        "branch_norms",
        "layernorm",
        "Comma-separated shortcut-branch normalisations to measure (model.branch_norm: layernorm, batchnorm, affine).",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "isas",
        "",
        "Comma-separated native kernel levels to time (avx512, avx2, portable); empty: every level this CPU runs; "
        "'none': XLA only.",
        flag_values=fv,
    )


def _run(fv, args: list[str]) -> int:
    if args:
        raise UserError(f"unexpected arguments {args}; packed_inference.py takes only flags")
    variants = fv["variants"].value
    try:
        batches = [int(b) for b in fv["batches"].value]
    except ValueError:
        raise UserError(f"--batches: {fv['batches'].value} are not all integers") from None
    if not variants or not batches:
        raise UserError("--variants and --batches must name at least one each")
    norms = fv["branch_norms"].value
    unknown = [n for n in norms if n not in BRANCH_NORMS]
    if not norms or unknown:
        raise UserError(f"--branch_norms: {unknown or norms} not among {list(BRANCH_NORMS)}")
    isas = fv["isas"].value
    unknown = [i for i in isas if i not in (*native.ISAS, "none")]
    if unknown or ("none" in isas and len(isas) > 1):
        raise UserError(f"--isas: {isas} must be 'none' or among {list(native.ISAS)}")
    benchmark(
        variants,
        batches,
        fv["min_time"].value,
        sizes_only=fv["sizes_only"].value,
        branch_norms=norms,
        isas=isas or None,
    )
    return 0


def benchmark(variants, batches, min_time=2.0, sizes_only=False, branch_norms=("layernorm",), isas=None):
    """Print the tables (see the module doc); ``sizes_only``: only the size table.

    ``isas``: the native levels (None: every one this CPU runs; ``["none"]``: XLA only).
    """
    if sizes_only:
        print_size_table(sizes(variants))
        return
    isas, why_not = native_isas(isas)
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cpus, "
        f"{platform.processor() or platform.machine()}"
    )
    clock = cpu_clock_hz()
    if isas:
        cores = native.num_threads()
        print(
            f"native kernels: levels {isas} (best {native.best_isa()}), {cores} threads; clock "
            + (f"{clock / 1e9:.2f} GHz (nominal, as /proc/cpuinfo 'cpu MHz' reports it)" if clock else "unknown")
        )
    else:
        cores = os.cpu_count() or 1
        print(f"no native rows: {why_not}")
    print("end to end:", flush=True)
    e2e = end_to_end(variants, batches, min_time, branch_norms, isas)
    print("linear layers (DeiT-S shapes):", flush=True)
    lin = linear_layers(batches, min_time, isas=isas)
    size_rows = sizes(variants)

    nat_ms = "".join(f" native {isa} ms |" for isa in isas)
    nat_x = "".join(f" native {isa} vs fp32 |" for isa in isas)
    nat_d = "".join(f" native {isa} vs xla max abs diff |" for isa in isas)
    print(
        "\n| model (binaryvit) | branch norm | batch | fp32 forward ms | bf16 forward ms | packed (xla) ms "
        f"| packed (xla), float attention ms |{nat_ms} packed (xla) vs fp32 |{nat_x} packed (xla) vs bf16 "
        f"| max abs logit diff |{nat_d} top-1 agreement |"
    )
    print("|" + "---|" * (11 + 3 * len(isas)))
    for v, bn, b, t, d, agree, nd in e2e:
        t32, t16, tp, tpf = t["fp32"], t["bf16"], t["packed"], t["packed_float_attn"]
        nat = [t[f"native_{isa}"] for isa in isas]
        print(
            f"| {v} | {bn} | {b} | {t32:.2f} | {t16:.2f} | {tp:.2f} | {tpf:.2f} |"
            + "".join(f" {tn:.2f} |" for tn in nat)
            + f" {t32 / tp:.1f}x |"
            + "".join(f" {t32 / tn:.1f}x |" for tn in nat)
            + f" {t16 / tp:.1f}x | {d:.1e} |"
            + "".join(f" {nd[isa]:.1e} |" for isa in isas)
            + f" {agree:.2f} |"
        )
    bad = [(v, bn, b, isa, nd[isa]) for v, bn, b, _, _, _, nd in e2e for isa in isas if nd[isa] != 0]
    if isas:
        print(
            "native logits vs the XLA packed path: "
            + ("bit for bit equal in every row" if not bad else f"DIFFER (variant, norm, batch, isa, max|d|): {bad}")
        )
    if len(branch_norms) > 1:
        packed_ms = {(v, bn, b): t["packed"] for v, bn, b, t, *_ in e2e}
        first = branch_norms[0]
        heads = " | ".join(f"packed {bn} / {first}" for bn in branch_norms[1:])
        print(f"\n| model (binaryvit) | batch | {heads} |")
        print("|---|---|" + "---|" * (len(branch_norms) - 1))
        for v in variants:
            for b in batches:
                ratios = [packed_ms[(v, bn, b)] / packed_ms[(v, first, b)] for bn in branch_norms[1:]]
                print(f"| {v} | {b} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    print(
        "\n| M x K x N | fp32 matmul ms | bf16 matmul ms | popcount matmul (xla) ms | packed linear (xla) ms "
        "| popcount vs fp32 | packed linear vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|")
    for m, k, n, t, ok in lin:
        assert ok, (m, k, n)
        t32, t16, tpc, tpl = t["fp32"], t["bf16"], t["popc"], t["linear"]
        print(
            f"| {m} x {k} x {n} | {t32:.3f} | {t16:.3f} | {tpc:.3f} | {tpl:.3f} | {t32 / tpc:.1f}x | {t32 / tpl:.1f}x |"
        )
    if isas:
        clock_s = f"{clock / 1e9:.2f} GHz nominal (/proc/cpuinfo 'cpu MHz')" if clock else "unknown clock"
        print(
            f"\nnative kernels; binary MACs per cycle per core = M*K*N / (time * {clock_s} * {cores} cores); "
            "native linear = the shift in XLA + native.sign_matmul (sign, pack, popcount matmul, alpha, bias)"
        )
        print(
            "\n| M x K x N | ISA | native popcount matmul ms | vs fp32 | vs xla popcount | MACs/cycle/core "
            "| native linear ms | vs fp32 | vs xla packed linear | MACs/cycle/core |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for m, k, n, t, _ in lin:
            for isa in isas:
                tnp, tnl = t[f"native_popc_{isa}"], t[f"native_linear_{isa}"]
                print(
                    f"| {m} x {k} x {n} | {isa} | {tnp:.3f} | {t['fp32'] / tnp:.1f}x | {t['popc'] / tnp:.1f}x "
                    f"| {_macs(m, k, n, tnp, clock, cores)} | {tnl:.3f} | {t['fp32'] / tnl:.1f}x "
                    f"| {t['linear'] / tnl:.1f}x | {_macs(m, k, n, tnl, clock, cores)} |"
                )
    print_size_table(size_rows)


def _macs(m, k, n, ms, clock, cores):
    """Binary MACs per cycle per core, formatted (``-`` without a clock)."""
    return f"{m * k * n / (ms * 1e-3 * clock * cores):.0f}" if clock else "-"


def print_size_table(size_rows):
    print(
        "\n| model (binaryvit) | fp model (preset fp) | binary checkpoint (fp32 latent) | file "
        "| accounting, full count "
        "| file / full | accounting, paper convention | file / paper | fp model / file |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for v, nbytes, a in size_rows:
        print(
            f"| {v} | {a['fp_model_bytes'] / 1e6:.2f} MB | {a['fp32_bytes'] / 1e6:.2f} MB | {nbytes / 1e6:.3f} MB "
            f"| {a['full_bytes'] / 1e6:.3f} MB | {nbytes / a['full_bytes']:.3f} | {a['paper_bytes'] / 1e6:.3f} MB "
            f"| {nbytes / a['paper_bytes']:.3f} | {a['fp_model_bytes'] / nbytes:.1f}x |"
        )


main = cli.command("benchmarks/packed_inference.py", __doc__, _define_flags, _run)


if __name__ == "__main__":
    sys.exit(main())
