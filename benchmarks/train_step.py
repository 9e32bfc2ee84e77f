r"""Train-step throughput: ``fp`` vs ``binaryvit``, side by side, on the current backend.

The step timed is the trainer's own (:func:`bvit_jax.train.trainer.make_train_step`):
the same loss, optimizer chain (GRS -> clip -> AdamW with the config's masks),
non-finite guard, flip-rate / oscillation statistics and, for ``binaryvit``,
the KD teacher forward (an ``fp`` model of the same size, randomly
initialised). Configs are the real recipes: ``configs/fashion_mnist.py`` for
``vit_micro_28`` and ``configs/imagenet_deit.py`` (224 px, 1000 classes) for DeiT;
only the batch size and the compute dtype are changed. Inputs are synthetic
(one fixed device-resident batch: no input pipeline in the timing).

Timing: every (variant, preset) step is compiled (and run twice: a second
compile would be reported) first; then ``--reps`` rounds each run ``--steps``
steps of every preset of a variant back to back (A, B, A, B, ...) and the
median per-step time is reported, so a noisy shared machine hits both presets
alike. ``ratio`` = step time / the first preset's step time in the same
round, median over rounds (the issue's target: binaryvit <= 1.25x fp);
``IQR`` = the interquartile range of the step times, a measure of the noise.
On CPU the table adds the process CPU time per step (all threads), which
other load on a shared machine disturbs less than wall time. ``PRESET:nokd``
(e.g. ``binaryvit:nokd``) is the preset with distillation off: the same
student step without the teacher forward; ``PRESET:tbf16`` the teacher
forward in bfloat16 (``distill.teacher_dtype``); ``PRESET:affine`` (any
``model.branch_norm``: ``layernorm``, ``batchnorm``, ``affine``) sets the normalisation on
the shortcut branch of every block linear (``model.overrides.branch_norm``);
suffixes combine, e.g. ``binaryvit:nokd:affine``.

MFU = model FLOPs per second / peak. Model FLOPs per step
``= 3 x 2 x forward MACs x batch`` with MACs from :func:`bvit_jax.nn.summary.summary`
(binary and full-precision MACs both count: training runs the binary layers
as float matmuls). ``MFU+T`` adds the teacher forward (``2 x teacher MACs x
batch``) for presets that distil. Peak: CPU ``--peak_gflops`` (default
~100 GFLOP/s per core in float32 (XLA's matmul rate on a current x86 core), x2 for bfloat16, times the cores
this process may run on); GPU / TPU a table of dense per-chip peaks by
``device_kind`` (``--peak_gflops`` overrides).

  python benchmarks/train_step.py                                  # CPU default (~6 minutes on 2 cores)
  python benchmarks/train_step.py --variants vit_micro_28 --batch 128 --steps 10 --reps 7
  python benchmarks/train_step.py --presets fp,binaryvit,binaryvit:nokd --json out.json
  python benchmarks/train_step.py --presets fp,binaryvit,binaryvit:batchnorm,binaryvit:affine  # branch norms
  python benchmarks/train_step.py --variants deit_tiny,deit_small --batch 256 --dtype bfloat16   # GPU/TPU
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bvit_jax import cli  # noqa: E402
from bvit_jax.errors import UserError  # noqa: E402
from bvit_jax.nn.models import get_variant, model_variables  # noqa: E402
from bvit_jax.nn.options import BRANCH_NORMS  # noqa: E402
from bvit_jax.nn.param_groups import latent_weight_mask  # noqa: E402
from bvit_jax.nn.summary import summary  # noqa: E402
from bvit_jax.runs.workdir import build_model  # noqa: E402
from bvit_jax.train.optim import build_optimizer  # noqa: E402
from bvit_jax.train.recipes import base_config, imagenet_deit_config  # noqa: E402
from bvit_jax.train.trainer import init_train_state, make_train_step, split_for_training  # noqa: E402

# Dense peak TFLOP/s per chip: (bfloat16, float32). float32 on A100/H100 is TF32
# (XLA's default matmul precision on those GPUs); TPUs run float32 matmuls as
# bfloat16 passes at default precision, so both columns hold the bf16 peak.
# Matched against jax.devices()[0].device_kind, first substring that matches wins.
PEAK_TFLOPS: list[tuple[str, tuple[float, float]]] = [
    ("H200", (989.0, 494.7)),
    ("H100 PCIe", (756.0, 378.0)),
    ("H100 NVL", (835.0, 418.0)),
    ("H100", (989.0, 494.7)),  # SXM
    ("A100", (312.0, 156.0)),
    ("L4", (121.0, 60.0)),
    ("A10", (125.0, 62.5)),
    ("V100", (125.0, 15.7)),  # fp16 tensor cores; bf16 is not native on V100
    ("T4", (65.0, 8.1)),
    ("TPU v2", (45.0, 45.0)),
    ("TPU v3", (123.0, 123.0)),
    ("TPU v4", (275.0, 275.0)),
    ("TPU v5 lite", (197.0, 197.0)),
    ("TPU v5e", (197.0, 197.0)),
    ("TPU v5p", (459.0, 459.0)),
    ("TPU v5", (459.0, 459.0)),
    ("TPU v6 lite", (918.0, 918.0)),
    ("TPU v6e", (918.0, 918.0)),
]
CPU_GFLOPS_PER_CORE = 100.0  # XLA fp32 matmul rate on a current x86 core; bf16 ~2x

DEFAULT_BATCH = {
    "cpu": {"vit_micro_28": 128, "deit_tiny": 16, "deit_small": 8},
    "accel": {"vit_micro_28": 1024, "deit_tiny": 256, "deit_small": 256},
}
DEFAULT_STEPS = {
    "cpu": {"vit_micro_28": 10, "deit_tiny": 2, "deit_small": 2},
    "accel": {"vit_micro_28": 20, "deit_tiny": 10, "deit_small": 10},
}


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def peak_flops(dtype: str, override_gflops: float | None) -> tuple[float, str]:
    """Peak FLOP/s of the devices this process uses, and where the number comes from."""
    if override_gflops:
        return override_gflops * 1e9, "--peak_gflops"
    backend = jax.default_backend()
    if backend == "cpu":
        cores = cpu_cores()
        per = CPU_GFLOPS_PER_CORE * (2 if dtype == "bfloat16" else 1)
        return per * cores * 1e9, f"{per:.0f} GFLOP/s/core x {cores} cores (assumed CPU peak)"
    kind = jax.devices()[0].device_kind
    for key, (bf16, fp32) in PEAK_TFLOPS:
        if key.lower() in kind.lower():
            t = bf16 if dtype == "bfloat16" else fp32
            return t * 1e12, f"{kind}: {t:g} TFLOP/s {dtype} dense (table)"
    return float("nan"), f"{kind}: unknown peak (pass --peak_gflops)"


def get_config(variant: str, preset: str, batch: int, dtype: str):
    """The trainer's config for ``variant`` / ``preset`` (the real recipe), batch and dtype set."""
    if variant.startswith("vit_micro_28"):
        from configs import fashion_mnist

        c = fashion_mnist.get_config(preset)
        c.model.variant = variant  # the config's default is vit_micro_28_p7
    elif variant.startswith("deit_"):
        c = imagenet_deit_config(variant, preset)
    else:
        v = get_variant(variant)
        c = base_config(preset, variant, "imagenet2012")
        c.model.num_classes = v.num_classes
        c.data.image_size, c.data.channels = v.image_size, v.in_channels
    c.global_batch_size = batch
    c.model.dtype = dtype
    c.total_steps = 10_000
    return c


class _CompileCounter:
    """Counts XLA compilations through JAX's public monitoring events (one event per backend compile)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == self.EVENT:
            self.count += 1


COMPILATIONS = _CompileCounter()


class Case:
    """One (variant, preset): the jitted trainer step, its state, a batch and its FLOPs."""

    def __init__(self, variant: str, preset_name: str, batch: int, dtype: str, seed: int = 0):
        self.variant, self.preset, self.batch = variant, preset_name, batch
        preset_name, *suffixes = preset_name.split(":")
        known = ("nokd", "tbf16", *BRANCH_NORMS)
        for suffix in suffixes:
            if suffix not in known:
                raise UserError(
                    f"unknown preset suffix {suffix!r} in {self.preset!r} (known: {', '.join(':' + k for k in known)})"
                )
        config = get_config(variant, preset_name, batch, dtype)
        if "nokd" in suffixes:  # the same student step without the teacher forward (KD off)
            config.distill.enabled = False
        for suffix in suffixes:
            if suffix in BRANCH_NORMS:  # the shortcut-branch normalisation (model.branch_norm)
                config.model.overrides.branch_norm = suffix
        model = build_model(config, seed=seed)
        self.macs = summary(model).macs
        graphdef, params, batch_stats = split_for_training(model)
        latent = latent_weight_mask(model, params)
        tx = build_optimizer(
            config,
            params,
            latent,
            total_steps=config.total_steps,
            warmup_steps=100,
            grs_warmup_steps=0,
        )
        self.teacher_macs = 0
        teacher_graphdef = self.teacher_params = None
        if config.distill.enabled:
            tcfg = get_config(variant, "fp", batch, dtype)
            # :tbf16 = config.distill.teacher_dtype="bfloat16": the teacher forward in bfloat16
            teacher = build_model(tcfg, seed=seed + 1, dtype="bfloat16" if "tbf16" in suffixes else None)
            self.teacher_macs = summary(teacher).macs
            teacher_graphdef, self.teacher_params = nnx.graphdef(teacher), model_variables(teacher)
        self.state = jax.jit(lambda p, s: init_train_state(p, tx, latent, s))(params, batch_stats)
        step = make_train_step(config, graphdef, latent, tx, teacher_graphdef)
        self.step = jax.jit(step, donate_argnums=0)
        rng = np.random.default_rng(seed)
        s, ch, k = config.data.image_size, config.data.channels, config.model.num_classes
        labels = rng.integers(0, k, batch)
        self.batch_arrays = {
            "image": jnp.asarray(rng.normal(size=(batch, s, s, ch)).astype(np.float32)),
            "label": jnp.asarray(np.eye(k, dtype=np.float32)[labels]),
            "label_index": jnp.asarray(labels.astype(np.int32)),
        }
        self.cpu_times: list[float] = []
        t0 = time.perf_counter()
        self.run(1)
        self.compile_s = time.perf_counter() - t0
        compiles = COMPILATIONS.count
        self.run(1)  # a second call must not compile again (it did while a parameter was weak-typed)
        if COMPILATIONS.count != compiles:
            print(f"  warning: {variant}/{preset_name}: the train step compiled again at its second call", flush=True)
        self.cpu_times.clear()
        self.times: list[float] = []

    def run(self, steps: int) -> float:
        """Run ``steps`` steps; records and returns wall seconds per step (CPU seconds in ``cpu_times``)."""
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch_arrays, self.teacher_params)
        jax.block_until_ready((self.state, metrics))
        dt = (time.perf_counter() - t0) / steps
        self.cpu_times.append((time.process_time() - c0) / steps)
        if not np.isfinite(float(metrics["loss"])):
            raise FloatingPointError(f"{self.variant}/{self.preset}: non-finite loss")
        return dt

    @property
    def flops(self) -> float:
        """Model FLOPs per step: 3 (forward + backward) x 2 FLOPs/MAC x MACs x batch."""
        return 6.0 * self.macs * self.batch

    @property
    def teacher_flops(self) -> float:
        return 2.0 * self.teacher_macs * self.batch


def parse_per_variant(
    parts: Sequence[str] | str | None, variants: list[str], defaults: dict[str, int], name: str
) -> dict[str, int]:
    """``["128"]`` (all variants) or ``["vit_micro_28=128", "deit_tiny=16"]`` (a comma-separated string
    is split the same way); unset -> defaults."""
    out = {v: defaults.get(v, defaults.get("deit_tiny", 8)) for v in variants}
    if not parts:
        return out
    if isinstance(parts, str):
        parts = parts.split(",")
    for part in parts:
        try:
            if "=" in part:
                k, v = part.split("=")
                if k not in out:
                    raise UserError(f"--{name}: {k!r} is not in --variants")
                out[k] = int(v)
            else:
                out = {k: int(part) for k in out}
        except ValueError:
            raise UserError(f"--{name}: {part!r} is not N or VARIANT=N") from None
    return out


def _define_flags(fv, argv: list[str]) -> None:
    del argv
    from absl import flags

    flags.DEFINE_list(
        "variants", "vit_micro_28,deit_tiny,deit_small", "Comma-separated model variants.", flag_values=fv
    )
    flags.DEFINE_list(
        "presets",
        "fp,binaryvit",
        "Comma-separated presets; the first is the ratio's base; "
        "PRESET:nokd is PRESET with distillation off (no teacher forward); "
        "PRESET:affine (or :batchnorm, :layernorm) sets model.overrides.branch_norm; "
        "suffixes combine (binaryvit:nokd:affine).",
        flag_values=fv,
    )
    flags.DEFINE_list("batch", None, "Batch size: N for all, or variant=N,... (defaults per backend).", flag_values=fv)
    flags.DEFINE_list(
        "steps", None, "Steps per timed round: N or variant=N,... (defaults per backend).", flag_values=fv
    )
    flags.DEFINE_integer("reps", 5, "Interleaved timed rounds; the median is reported.", lower_bound=1, flag_values=fv)
    flags.DEFINE_enum(
        "dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay float32).", flag_values=fv
    )
    flags.DEFINE_float(
        "peak_gflops", None, "Peak GFLOP/s of the devices used (overrides the defaults).", flag_values=fv
    )
    flags.DEFINE_string("json", None, "Also write the rows (and machine facts) to this JSON file.", flag_values=fv)


def _run(fv, args: list[str]) -> int:
    if args:
        raise UserError(f"unexpected arguments {args}; train_step.py takes only flags")
    benchmark(
        variants=fv["variants"].value,
        presets=fv["presets"].value,
        batch=fv["batch"].value,
        steps=fv["steps"].value,
        reps=fv["reps"].value,
        dtype=fv["dtype"].value,
        peak_gflops=fv["peak_gflops"].value,
        json_path=fv["json"].value,
    )
    return 0


def benchmark(
    variants: Sequence[str] = ("vit_micro_28", "deit_tiny", "deit_small"),
    presets: Sequence[str] = ("fp", "binaryvit"),
    batch: Sequence[str] | str | None = None,
    steps: Sequence[str] | str | None = None,
    reps: int = 5,
    dtype: str = "float32",
    peak_gflops: float | None = None,
    json_path: str | None = None,
) -> list[dict]:
    """Time the train step of every (variant, preset), print the table; returns the rows (see the module doc)."""
    variants = [v for v in variants if v]
    presets = [p for p in presets if p]
    if not variants or not presets:
        raise UserError("--variants and --presets must name at least one each")
    kind = "cpu" if jax.default_backend() == "cpu" else "accel"
    batches = parse_per_variant(batch, variants, DEFAULT_BATCH[kind], "batch")
    steps_per = parse_per_variant(steps, variants, DEFAULT_STEPS[kind], "steps")
    peak, peak_src = peak_flops(dtype, peak_gflops)
    dev = jax.devices()[0]
    print(
        f"backend={jax.default_backend()} device={dev.device_kind} devices_used=1"
        f"{f' cores={cpu_cores()}' if kind == 'cpu' else ''} jax={jax.__version__} dtype={dtype}"
    )
    print(f"peak={peak / 1e9:,.0f} GFLOP/s ({peak_src}); reps={reps}, median per-step time")

    rows = []
    for variant in variants:
        cases = []
        for preset in presets:
            t0 = time.perf_counter()
            cases.append(Case(variant, preset, batches[variant], dtype))
            print(f"  built+compiled {variant}/{preset} in {time.perf_counter() - t0:.1f}s", flush=True)
        for _ in range(reps):
            for c in cases:
                c.times.append(c.run(steps_per[variant]))
        base = cases[0]
        for c in cases:
            t, cpu = statistics.median(c.times), statistics.median(c.cpu_times)
            q = statistics.quantiles(c.times, n=4) if len(c.times) > 1 else [t, t, t]
            rows.append(
                {
                    "variant": variant,
                    "preset": c.preset,
                    "batch": c.batch,
                    "step_ms": 1e3 * t,
                    "iqr_pct": 100 * (q[2] - q[0]) / t,
                    "img_s": c.batch / t,
                    "gmacs": c.macs / 1e9,
                    "gflop_step": c.flops / 1e9,
                    "mfu": c.flops / t / peak,
                    "mfu_t": (c.flops + c.teacher_flops) / t / peak,
                    # ratios of rounds run back to back (the same load on a shared machine), median over rounds
                    "ratio": statistics.median(a / b for a, b in zip(c.times, base.times)),
                    "cpu_ms": 1e3 * cpu,
                    "cpu_ratio": statistics.median(a / b for a, b in zip(c.cpu_times, base.cpu_times)),
                    "compile_s": c.compile_s,
                    "times_s": list(c.times),
                    "cpu_times_s": list(c.cpu_times),
                }
            )
        del cases

    cpu = kind == "cpu"
    print()
    head = [
        "variant",
        "preset",
        "batch",
        "step ms",
        "IQR",
        "img/s",
        "GMAC/img",
        "GFLOP/step",
        "MFU",
        "MFU+T",
        f"ratio vs {presets[0]}",
    ] + (["CPU-s/step", "CPU-time ratio"] if cpu else [])
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    for r in rows:
        cells = [
            r["variant"],
            r["preset"],
            str(r["batch"]),
            f"{r['step_ms']:,.1f}",
            f"{r['iqr_pct']:.0f}%",
            f"{r['img_s']:,.1f}",
            f"{r['gmacs']:.3f}",
            f"{r['gflop_step']:,.1f}",
            f"{100 * r['mfu']:.1f}%",
            f"{100 * r['mfu_t']:.1f}%",
            f"{r['ratio']:.2f}x",
        ]
        if cpu:
            cells += [f"{r['cpu_ms'] / 1e3:,.2f}", f"{r['cpu_ratio']:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    if "binaryvit" in presets and presets[0] == "fp":
        print()
        for r in rows:
            if r["preset"] == "binaryvit":
                verdict = "met" if r["ratio"] <= 1.25 else "not met"
                print(f"target binaryvit <= 1.25x fp at {r['variant']}: {r['ratio']:.2f}x ({verdict})")
    if json_path:
        import json

        facts = {
            "backend": jax.default_backend(),
            "device_kind": dev.device_kind,
            "jax": jax.__version__,
            "dtype": dtype,
            "peak_flops": peak,
            "peak_source": peak_src,
            "reps": reps,
            "cores": cpu_cores() if cpu else None,
        }
        Path(json_path).write_text(json.dumps({"machine": facts, "rows": rows}, indent=2))
    return rows


main = cli.command("benchmarks/train_step.py", __doc__, _define_flags, _run)


if __name__ == "__main__":
    sys.exit(main())
