"""Packed (XNOR-popcount) inference vs the training-time forward, on this CPU.

Run (not a test; takes a few minutes on 2 cores)::

    nice -n 10 .venv/bin/python benchmarks/packed_inference.py [--variants=deit_tiny,deit_small] [--batches=1,8] \
        [--branch_norms=layernorm,batchnorm,affine]

Prints markdown tables (the ones in ``docs/export.md``):

1. End to end, per variant and batch: the ``binaryvit`` model's training-time
   forward ``model(x)`` under ``jax.jit`` in float32 and in bfloat16 (latent
   float weights, binarized on the fly, float matmuls) vs
   :func:`bvit_jax.deploy.packed.packed_forward` (XNOR-popcount linears and binary
   attention; also with the attention matmuls left in float), with the max
   |logit| difference packed vs float32. ``--branch_norms`` (default
   ``layernorm``) lists the shortcut-branch normalisations to measure
   (``model.branch_norm``: ``layernorm``, ``batchnorm``, ``affine``), side by side in one
   run; with more than one, a last table gives each one's packed time as a
   ratio to the first's.
2. The linear layers alone at DeiT-S shapes: fp32 and bf16 ``x @ W`` vs the
   popcount matmul on packed words (:func:`bvit_jax.deploy.bitops.packed_matmul`), and vs the whole packed
   linear (sign + pack of the activation, popcount matmul, ``alpha``, bias).
3. The file sizes vs the accounting (full count and paper convention).

Times are medians of repeated calls after a warm-up (compilation excluded).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bvit_jax import cli  # noqa: E402
from bvit_jax.deploy.bitops import pack_planes, packed_matmul  # noqa: E402
from bvit_jax.deploy.export import export_model, pack_model  # noqa: E402
from bvit_jax.deploy.packed import packed_forward  # noqa: E402
from bvit_jax.errors import UserError  # noqa: E402
from bvit_jax.nn.models import create  # noqa: E402
from bvit_jax.nn.options import BRANCH_NORMS  # noqa: E402
from bvit_jax.nn.summary import size_accounting  # noqa: E402


def time_interleaved(fns, min_time=1.0, min_reps=5, max_reps=200):
    """Median wall times (ms) of several zero-argument functions, timed in turn.

    Round-robin order, so that a machine whose load changes (other users on a
    shared CPU) slows every contender alike.
    """
    for f in fns.values():
        jax.block_until_ready(f())
        jax.block_until_ready(f())
    times = {k: [] for k in fns}
    start = time.perf_counter()
    while True:
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t)
        n = len(times[next(iter(fns))])
        if n >= max_reps or (n >= min_reps and time.perf_counter() - start >= min_time * len(fns)):
            break
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


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


def end_to_end(variants, batches, min_time, branch_norms=("layernorm",)):
    rows = []
    for variant, bn in ((v, bn) for v in variants for bn in branch_norms):
        # Perturbed like a trained model (a fresh one has every shift exactly 0, an
        # untypical case; docs/export.md, "Exactness").
        model = perturb(create(variant, "binaryvit", branch_norm=bn))
        model_bf16 = create(variant, "binaryvit", dtype=jnp.bfloat16, branch_norm=bn)
        nnx.update(model_bf16, nnx.state(model))  # parameters and BatchNorm statistics
        packed = pack_model(model)
        f32, bf16 = jit_model(model), jit_model(model_bf16)
        cfg = model.cfg
        for b in batches:
            x = jax.random.normal(jax.random.key(b), (b, cfg.image_size, cfg.image_size, cfg.in_channels))
            diff = float(jnp.max(jnp.abs(packed_forward(packed, x) - f32(x))))
            agree = float(jnp.mean(jnp.argmax(packed_forward(packed, x), -1) == jnp.argmax(f32(x), -1)))
            t = time_interleaved(
                {
                    "fp32": lambda: f32(x),
                    "bf16": lambda: bf16(x),
                    "packed": lambda: packed_forward(packed, x),
                    "packed_float_attn": lambda: packed_forward(packed, x, attention="float"),
                },
                min_time=min_time,
            )
            t32, t16, tp, tpf = t["fp32"], t["bf16"], t["packed"], t["packed_float_attn"]
            rows.append((variant, bn, b, t32, t16, tp, tpf, diff, agree))
            print(
                f"  {variant} ({bn}) b={b}: fp32 {t32:.2f} ms, bf16 {t16:.2f} ms, packed {tp:.2f} ms "
                f"(float attention {tpf:.2f} ms), max|dlogit| {diff:.2e}, top-1 agreement {agree:.2f}",
                flush=True,
            )
    return rows


def linear_layers(batches, min_time, dim=384, hidden=1536, tokens=197):
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

    live = np.bool_(True)

    for b in batches:
        m = b * tokens
        for k, n in ((dim, dim), (dim, hidden), (hidden, dim)):
            x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
            w = jnp.asarray(np.where(rng.standard_normal((k, n)) >= 0, 1.0, -1.0).astype(np.float32))
            words = pack_planes(w.T).T  # (k/32, n)
            xw = pack_planes(x)
            shift, alpha, bias = jnp.zeros((k,)), jnp.ones((n,)), jnp.zeros((n,))
            ok = bool(jnp.all(popc(xw, words, k) == (jnp.where(x >= 0, 1.0, -1.0) @ w).astype(jnp.int32)))
            x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
            t = time_interleaved(
                {
                    "fp32": lambda: fp32_mm(x, w),
                    "bf16": lambda: bf16_mm(x16, w16),
                    "popc": lambda: popc(xw, words, k),
                    "linear": lambda: packed_linear(x, shift, words, alpha, bias, live),
                },
                min_time=min_time,
            )
            t32, t16, tpc, tpl = t["fp32"], t["bf16"], t["popc"], t["linear"]
            rows.append((m, k, n, t32, t16, tpc, tpl, ok))
            print(
                f"  M={m} K={k} N={n}: fp32 {t32:.3f} ms, bf16 {t16:.3f}, popcount {tpc:.3f}, "
                f"packed linear {tpl:.3f} (exact: {ok})",
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
    benchmark(variants, batches, fv["min_time"].value, sizes_only=fv["sizes_only"].value, branch_norms=norms)
    return 0


def benchmark(variants, batches, min_time=2.0, sizes_only=False, branch_norms=("layernorm",)):
    """Print the tables (see the module doc); ``sizes_only``: only the size table."""
    if sizes_only:
        print_size_table(sizes(variants))
        return
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cpus, "
        f"{platform.processor() or platform.machine()}"
    )
    print("end to end:", flush=True)
    e2e = end_to_end(variants, batches, min_time, branch_norms)
    print("linear layers (DeiT-S shapes):", flush=True)
    lin = linear_layers(batches, min_time)
    size_rows = sizes(variants)

    print(
        "\n| model (binaryvit) | branch norm | batch | fp32 forward ms | bf16 forward ms | packed ms "
        "| packed, float attention ms | packed vs fp32 | packed vs bf16 | max abs logit diff | top-1 agreement |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for v, bn, b, t32, t16, tp, tpf, d, agree in e2e:
        print(
            f"| {v} | {bn} | {b} | {t32:.2f} | {t16:.2f} | {tp:.2f} | {tpf:.2f} | {t32 / tp:.1f}x | {t16 / tp:.1f}x "
            f"| {d:.1e} | {agree:.2f} |"
        )
    if len(branch_norms) > 1:
        packed_ms = {(v, bn, b): tp for v, bn, b, _, _, tp, *_ in e2e}
        first = branch_norms[0]
        heads = " | ".join(f"packed {bn} / {first}" for bn in branch_norms[1:])
        print(f"\n| model (binaryvit) | batch | {heads} |")
        print("|---|---|" + "---|" * (len(branch_norms) - 1))
        for v in variants:
            for b in batches:
                ratios = [packed_ms[(v, bn, b)] / packed_ms[(v, first, b)] for bn in branch_norms[1:]]
                print(f"| {v} | {b} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    print(
        "\n| M x K x N | fp32 matmul ms | bf16 matmul ms | popcount matmul ms | packed linear ms "
        "| popcount vs fp32 | packed linear vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|")
    for m, k, n, t32, t16, tpc, tpl, ok in lin:
        assert ok
        print(
            f"| {m} x {k} x {n} | {t32:.3f} | {t16:.3f} | {tpc:.3f} | {tpl:.3f} | {t32 / tpc:.1f}x | {t32 / tpl:.1f}x |"
        )
    print_size_table(size_rows)


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
