r"""Input pipeline throughput on one CPU core (images/s).

Synthetic ImageNet-sized JPEGs (500x375, photo-like, quality 90; plus a
1000x750 set where JPEG draft decoding matters) held in memory, so the
numbers are preprocessing cost only (no disk). The process is pinned to one
core; grain runs with one reader thread and no worker processes.

"images/s per core" is images per second of this process's CPU time
(`time.process_time`, all threads), which is what one dedicated core
delivers and does not depend on what else runs on a shared machine; the
wall-clock rate is printed beside it.

  python benchmarks/input_pipeline.py            # ~1 minute
  python benchmarks/input_pipeline.py --quick    # a few seconds

Rows:
  per-image ops  train_image / eval_image + normalise in a plain loop;
  grain          create_train_iterator / create_eval_iterator end to end
                 (batch 64) over an in-memory source.
"""

from __future__ import annotations

import io
import os
import sys
import time

import numpy as np
from PIL import Image

from bvit_jax import cli
from bvit_jax.data import config as config_lib
from bvit_jax.data import pipeline
from bvit_jax.errors import UserError


def synthetic_jpegs(n: int, size=(500, 375), seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: smooth colour fields plus fine noise (quality 90)."""
    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (h // 16, w // 16, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class MemorySource:
    """A grain RandomAccessDataSource over in-memory encoded images.

    Pretends to hold `length` examples (ImageNet's 1281167 by default, so the
    index permutation costs what it costs on ImageNet), cycling the images.
    """

    def __init__(self, images: list[bytes], length: int = 1281167):
        self._images = images
        self._length = length

    def __len__(self):
        return self._length

    def __getitem__(self, i):
        return {"image": self._images[i % len(self._images)], "label": i % 1000}


def _time(fn, n: int, min_seconds: float) -> tuple[float, float]:
    """(calls per CPU second, calls per wall second) over >= n calls."""
    fn(0)  # warm up
    wall, cpu, count = time.perf_counter(), time.process_time(), 0
    while count < n or time.process_time() - cpu < min_seconds:
        fn(count)
        count += 1
    return (count / (time.process_time() - cpu), count / (time.perf_counter() - wall))


def bench_ops(images, cfg, train: bool, seconds: float):
    settings = pipeline.ImageSettings.from_config(cfg)
    norm = pipeline.Normalize(cfg.mean, cfg.std, cfg.channels)
    rng = np.random.default_rng(0)

    def one(i):
        data = images[i % len(images)]
        x = pipeline.train_image(data, rng, settings) if train else pipeline.eval_image(data, settings)
        norm(x[None])

    return _time(one, len(images), seconds)


def bench_grain(images, cfg, train: bool, seconds: float, batch: int = 64):
    cfg = cfg.copy_and_resolve_references()
    cfg.num_classes, cfg.num_threads, cfg.num_workers = 1000, 1, 0
    cfg.prefetch = 2
    source = MemorySource(images, length=1281167 if train else len(images))
    if train:
        it = pipeline.create_train_iterator(cfg, batch, seed=0, process_index=0, process_count=1, source=source)
        cpu, wall = _time(lambda i: next(it), 4, seconds)
        return cpu * batch, wall * batch

    def one_pass(i):
        del i
        for _ in pipeline.create_eval_iterator(cfg, batch, 0, 1, source=source):
            pass

    cpu, wall = _time(one_pass, 2, seconds)
    return cpu * len(images), wall * len(images)


def _define_flags(fv, argv: list[str]) -> None:
    del argv
    from absl import flags

    flags.DEFINE_bool("quick", False, "A few seconds: 32 images, 0.5 s per row (ignores --num_images).", flag_values=fv)
    flags.DEFINE_integer(
        "num_images", 256, "Synthetic 500x375 JPEGs (a quarter as many 1000x750).", lower_bound=1, flag_values=fv
    )


def _run(fv, args: list[str]) -> int:
    if args:
        raise UserError(f"unexpected arguments {args}; input_pipeline.py takes only flags")
    benchmark(quick=fv["quick"].value, num_images=fv["num_images"].value)
    return 0


def benchmark(quick: bool = False, num_images: int = 256) -> None:
    """Time every row (see the module doc) and print the table."""
    seconds = 0.5 if quick else 4.0
    num = 32 if quick else num_images
    if hasattr(os, "sched_setaffinity"):
        cpu = sorted(os.sched_getaffinity(0))[-1]
        os.sched_setaffinity(0, {cpu})
        print(f"pinned to CPU {cpu}")
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l for l in f if l.startswith("model name")).split(":")[1]
        print(f"CPU: {model.strip()}")
    except (OSError, StopIteration):
        pass
    import PIL
    from PIL import features

    print(f"Pillow {PIL.__version__}, libjpeg-turbo {features.version('libjpeg_turbo')}")

    small = synthetic_jpegs(num, (500, 375))
    large = synthetic_jpegs(max(num // 4, 8), (1000, 750), seed=1)
    base = config_lib.default_data_config("imagenet2012")

    def variant(**kw):
        c = base.copy_and_resolve_references()
        for k, v in kw.items():
            setattr(c, k, v)
        return c

    plain = dict(randaugment="", random_erase_prob=0.0, mixup_alpha=0.0, cutmix_alpha=0.0)
    rows = [
        (
            "train: decode+RRC+flip+normalise",
            "500x375",
            "ops",
            lambda: bench_ops(small, variant(**plain), True, seconds),
        ),
        (
            "  same, no JPEG draft",
            "500x375",
            "ops",
            lambda: bench_ops(small, variant(jpeg_draft=False, **plain), True, seconds),
        ),
        (
            "  same, bilinear instead of bicubic",
            "500x375",
            "ops",
            lambda: bench_ops(small, variant(interpolation="bilinear", **plain), True, seconds),
        ),
        ("  same", "1000x750", "ops", lambda: bench_ops(large, variant(**plain), True, seconds)),
        (
            "  same, no JPEG draft",
            "1000x750",
            "ops",
            lambda: bench_ops(large, variant(jpeg_draft=False, **plain), True, seconds),
        ),
        (
            "train + RandAugment rand-m9-mstd0.5-inc1",
            "500x375",
            "ops",
            lambda: bench_ops(small, variant(randaugment="rand-m9-mstd0.5-inc1", random_erase_prob=0.0), True, seconds),
        ),
        (
            "train, no RandAugment (batch 64)",
            "500x375",
            "grain",
            lambda: bench_grain(small, variant(**plain), True, seconds),
        ),
        (
            "train, full DeiT recipe (RA+erase+mixup/cutmix)",
            "500x375",
            "grain",
            lambda: bench_grain(small, variant(), True, seconds),
        ),
        (
            "eval: decode+resize 256+crop 224+normalise",
            "500x375",
            "ops",
            lambda: bench_ops(small, variant(), False, seconds),
        ),
        ("  same", "1000x750", "ops", lambda: bench_ops(large, variant(), False, seconds)),
        (
            "  same, eval_jpeg_draft=True",
            "1000x750",
            "ops",
            lambda: bench_ops(large, variant(eval_jpeg_draft=True), False, seconds),
        ),
        ("eval (batch 64)", "500x375", "grain", lambda: bench_grain(small, variant(), False, seconds)),
    ]
    print("| pipeline | JPEG size | harness | images/s per core (CPU time) | images/s wall |")
    print("|---|---|---|---|---|")
    for name, size, harness, fn in rows:
        cpu, wall = fn()
        print(f"| {name} | {size} | {harness} | {cpu:.0f} | {wall:.0f} |", flush=True)


main = cli.command("benchmarks/input_pipeline.py", __doc__, _define_flags, _run)


if __name__ == "__main__":
    sys.exit(main())
