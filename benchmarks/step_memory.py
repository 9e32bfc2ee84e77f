r"""Train-step memory: XLA's buffer assignment of the compiled trainer step, per image, side by side.

The step is the trainer's own (:func:`bvit_jax.train.trainer.make_train_step` with the
optimizer of :func:`bvit_jax.train.optim.build_optimizer`, the state donated as the
trainer donates it), for the real recipes (``configs/fashion_mnist.py`` for
``vit_micro_28``, ``configs/imagenet_deit.py`` for DeiT, as
``benchmarks/train_step.py``), with a uint8 image batch and integer labels
as the input pipeline yields them (the device-side preprocessing is part of
the step). Everything is abstract (``jax.ShapeDtypeStruct``): the step is only
lowered and compiled, never run, so DeiT-B fits on a small machine.

From ``jax.jit(step).lower(...).compile().memory_analysis()``:

* ``temp``: XLA's temporary buffers (activations saved for the backward,
  gradients, workspace), the part that grows with the batch;
* ``args`` / ``out``: the step's inputs (train state, batch, teacher
  parameters) and outputs; ``alias``: the output bytes that reuse a donated
  input buffer (the new train state in place of the old);
* ``total = args + out - alias + temp``: everything the step holds at once;
* ``/img``: ``total / batch`` and ``temp / batch``.

These are the buffer sizes of the backend that compiles (XLA:CPU on a CPU
machine); XLA:GPU and XLA:TPU fuse and schedule differently, so their
figures differ (compare rows of one backend only).

``--remat`` sets ``config.model.remat_policy`` (rematerialisation of each
block, :data:`bvit_jax.nn.models.REMAT_POLICIES`) when this version of the
library has it; ``PRESET:nokd`` turns distillation off (no teacher forward).

  python benchmarks/step_memory.py --variants deit_base --presets fp,binaryvit --dtypes float32,bfloat16 --batch 8
  python benchmarks/step_memory.py --variants deit_small,deit_base --presets binaryvit --remat none,full,dots_saveable
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.train_step import get_config  # noqa: E402
from bvit_jax import cli  # noqa: E402
from bvit_jax.errors import UserError  # noqa: E402
from bvit_jax.nn import models as models_lib  # noqa: E402
from bvit_jax.nn.models import model_variables  # noqa: E402
from bvit_jax.nn.param_groups import latent_weight_mask  # noqa: E402
from bvit_jax.runs.workdir import build_model  # noqa: E402
from bvit_jax.train.optim import build_optimizer  # noqa: E402
from bvit_jax.train.trainer import init_train_state, make_train_step, split_for_training  # noqa: E402

MIB = 2.0**20


def remat_policies() -> tuple[str, ...]:
    """The names of ``bvit_jax.nn.models.REMAT_POLICIES``, or ``()`` where this version has none."""
    return tuple(getattr(models_lib, "REMAT_POLICIES", {}))


def step_memory(variant: str, preset: str, batch: int, dtype: str, remat: str | None = None) -> dict:
    """Compile the trainer step of one case (abstract inputs) and return its ``memory_analysis`` in bytes."""
    name, *suffixes = preset.split(":")
    for s in suffixes:
        if s != "nokd":
            raise UserError(f"unknown preset suffix {s!r} in {preset!r} (known: :nokd)")
    config = get_config(variant, name, batch, dtype)
    if "nokd" in suffixes:
        config.distill.enabled = False
    if remat is not None:
        if remat not in remat_policies():
            known = ", ".join(remat_policies()) or "none in this version of bvit_jax.nn.models"
            raise UserError(f"--remat {remat!r}: not a model.remat_policy ({known})")
        config.model.remat_policy = remat
    model = build_model(config, abstract=True)
    graphdef, params, batch_stats = split_for_training(model)
    latent = latent_weight_mask(model, params)
    tx = build_optimizer(config, params, latent, total_steps=config.total_steps, warmup_steps=100, grs_warmup_steps=0)
    teacher_graphdef, tparams = None, None
    if config.distill.enabled:
        teacher = build_model(get_config(variant, "fp", batch, dtype), abstract=True)
        teacher_graphdef, tparams = nnx.graphdef(teacher), model_variables(teacher)
    state = jax.eval_shape(lambda p, s: init_train_state(p, tx, latent, s), params, batch_stats)
    s, ch = config.data.image_size, config.data.channels
    batch_arrays = {
        "image": jax.ShapeDtypeStruct((batch, s, s, ch), jnp.uint8),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
    }
    step = make_train_step(config, graphdef, latent, tx, teacher_graphdef)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch_arrays, tparams).compile()
    mem = compiled.memory_analysis()
    out = {
        "variant": variant,
        "preset": preset,
        "dtype": dtype,
        "remat": remat or "-",
        "batch": batch,
        "compile_s": time.perf_counter() - t0,
    }
    for key in ("temp", "argument", "output", "alias", "generated_code"):
        out[key] = int(getattr(mem, f"{key}_size_in_bytes"))
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _define_flags(fv, argv: list[str]) -> None:
    del argv
    from absl import flags

    flags.DEFINE_list("variants", "deit_base", "Comma-separated model variants.", flag_values=fv)
    flags.DEFINE_list("presets", "fp,binaryvit", "Comma-separated presets (PRESET:nokd: no teacher).", flag_values=fv)
    flags.DEFINE_list("dtypes", "float32", "Comma-separated compute dtypes (float32, bfloat16).", flag_values=fv)
    flags.DEFINE_list(
        "remat", None, "Comma-separated model.remat_policy values (unset: the config's default).", flag_values=fv
    )
    flags.DEFINE_integer("batch", 8, "Global batch of the compiled step.", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("json", None, "Also write the rows to this JSON file.", flag_values=fv)


def _run(fv, args: list[str]) -> int:
    if args:
        raise UserError(f"unexpected arguments {args}; step_memory.py takes only flags")
    benchmark(
        fv["variants"].value,
        fv["presets"].value,
        fv["dtypes"].value,
        fv["batch"].value,
        fv["remat"].value,
        fv["json"].value,
    )
    return 0


def benchmark(
    variants: Sequence[str],
    presets: Sequence[str],
    dtypes: Sequence[str] = ("float32",),
    batch: int = 8,
    remat: Sequence[str] | None = None,
    json_path: str | None = None,
) -> list[dict]:
    """Compile every (variant, preset, dtype, remat) step, print the table; returns the rows (module doc)."""
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            raise UserError(f"--dtypes: {d!r} is not float32 or bfloat16")
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} jax={jax.__version__} batch={batch}")
    rows = []
    for variant in variants:
        for preset in presets:
            for dtype in dtypes:
                for policy in remat or [None]:
                    r = step_memory(variant, preset, batch, dtype, policy)
                    print(
                        f"  compiled {variant}/{preset}/{dtype}/remat={r['remat']} in {r['compile_s']:.0f}s", flush=True
                    )
                    rows.append(r)
    head = ["variant", "preset", "dtype", "remat", "batch", "args MiB", "out MiB", "alias MiB", "temp MiB"]
    head += ["total MiB", "total MiB/img", "temp MiB/img"]
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|")
    for r in rows:
        b = r["batch"]
        cells = [r["variant"], r["preset"], r["dtype"], r["remat"], str(b)]
        cells += [f"{r[k] / MIB:,.1f}" for k in ("argument", "output", "alias", "temp", "total")]
        cells += [f"{r['total'] / b / MIB:,.1f}", f"{r['temp'] / b / MIB:,.1f}"]
        print("| " + " | ".join(cells) + " |")
    if json_path:
        import json

        Path(json_path).write_text(json.dumps({"backend": jax.default_backend(), "rows": rows}, indent=2))
    return rows


main = cli.command("benchmarks/step_memory.py", __doc__, _define_flags, _run)


if __name__ == "__main__":
    sys.exit(main())
