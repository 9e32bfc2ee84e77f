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
  python benchmarks/input_pipeline.py --workers=0,1,2,4 [--data_dir=DIR]   # worker sweep, full DeiT recipe

The worker sweep (``--workers``) times the trainer's host pipeline for
ImageNet with the full DeiT recipe (decode, RandomResizedCrop, flip,
RandAugment on the host in uint8; erasing, Mixup / CutMix and normalisation
are on the device, `bvit_jax.data.DevicePreprocess`) for each worker count,
unpinned, in wall-clock images/s, and divides by the cores used
(``max(workers, 1)``). It reads the ``imagenet2012`` train split of a TFDS
ArrayRecord build in ``--data_dir`` (e.g. the test suite's tiny synthetic
build: ``tests/data_fixtures.make_fake_imagenet`` + ``bvit-prepare``), or the
in-memory synthetic JPEGs without it. It also prints the per-image cost of
each host stage (decode, crop, flip, RandAugment) in ms of CPU time.

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
from bvit_jax.data import eval_transform, pipeline, transforms
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
    settings = transforms.ImageSettings.from_config(cfg)
    norm = eval_transform.Normalize(cfg.mean, cfg.std, cfg.channels)
    rng = np.random.default_rng(0)

    def one(i):
        data = images[i % len(images)]
        x = transforms.train_image(data, rng, settings) if train else eval_transform.eval_image(data, settings)
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


def bench_workers(cfg, source, workers: list[int], seconds: float, batch: int = 64) -> list[tuple]:
    """``[(workers, img/s wall, img/s per core)]`` for the train iterator (``num_threads=1`` per process)."""
    rows = []
    for n in workers:
        c = cfg.copy_and_resolve_references()
        c.num_workers, c.num_threads, c.prefetch = n, 1, 2
        it = pipeline.create_train_iterator(c, batch, seed=0, process_index=0, process_count=1, source=source)
        try:
            for _ in range(max(2, n)):  # start the workers, fill the pipeline
                next(it)
            t0, count = time.perf_counter(), 0
            while count < 4 or time.perf_counter() - t0 < seconds:
                next(it)
                count += 1
            rate = count * batch / (time.perf_counter() - t0)
        finally:
            if hasattr(it, "close"):
                it.close()
        rows.append((n, rate, rate / max(n, 1)))
    return rows


def stage_profile(images, cfg, n: int) -> list[tuple[str, float]]:
    """ms of CPU time per image for each host stage of the train transform (cumulative differences)."""
    from bvit_jax.data import augment
    from bvit_jax.data import decode as decode_lib

    s = transforms.ImageSettings.from_config(cfg)
    rng = np.random.default_rng(0)

    def run(upto: str):
        t = time.process_time()
        for i in range(n):
            img = decode_lib.open_image(images[i % len(images)])
            if upto == "decode":
                decode_lib.load(img, 3)
                continue
            img = augment.random_resized_crop(
                img, s.size, rng, channels=3, interpolation=s.interpolation, use_draft=s.jpeg_draft
            )
            if upto != "crop":
                img = img.transpose(0) if rng.random() < 0.5 else img
            if upto == "randaugment":
                img = s.randaugment(img, rng)
            decode_lib.to_array(img, 3)
        return (time.process_time() - t) / n * 1e3

    out, prev = [], 0.0
    for name in ("decode", "crop", "flip", "randaugment"):
        total = run(name)
        out.append((name, total - prev))
        prev = total
    out.append(("total", prev))
    return out


def _define_flags(fv, argv: list[str]) -> None:
    del argv
    from absl import flags

    flags.DEFINE_bool("quick", False, "A few seconds: 32 images, 0.5 s per row (ignores --num_images).", flag_values=fv)
    flags.DEFINE_integer(
        "num_images", 256, "Synthetic 500x375 JPEGs (a quarter as many 1000x750).", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_list(
        "workers", [], "Worker counts to sweep (e.g. 0,1,2,4); empty: the per-core table.", flag_values=fv
    )
    flags.DEFINE_string(
        "data_dir", None, "TFDS data dir with an imagenet2012 ArrayRecord build (sweep).", flag_values=fv
    )
    flags.DEFINE_float("seconds", 10.0, "Seconds per worker count in the sweep.", flag_values=fv)
    flags.DEFINE_enum(
        "interpolation",
        "bicubic",
        ["bicubic", "bilinear"],
        "The sweep's resampling filter (the DeiT recipe's is bicubic).",
        flag_values=fv,
    )


def _run(fv, args: list[str]) -> int:
    if args:
        raise UserError(f"unexpected arguments {args}; input_pipeline.py takes only flags")
    if fv["workers"].value:
        sweep(
            [int(w) for w in fv["workers"].value],
            fv["data_dir"].value,
            fv["seconds"].value,
            fv["num_images"].value,
            fv["interpolation"].value,
        )
        return 0
    benchmark(quick=fv["quick"].value, num_images=fv["num_images"].value)
    return 0


def sweep(
    workers: list[int], data_dir: str | None, seconds: float, num_images: int, interpolation: str = "bicubic"
) -> None:
    """The worker sweep and the stage profile (see the module doc)."""
    cfg = config_lib.default_data_config("imagenet2012")  # the full DeiT recipe
    cfg.num_classes = 1000
    cfg.interpolation = interpolation
    images = synthetic_jpegs(min(num_images, 64), (500, 375))
    if data_dir:
        from bvit_jax.data import sources

        cfg.data_dir = data_dir
        source = sources.get_source(cfg, cfg.train_split)
        where = f"TFDS imagenet2012 train in {data_dir} ({len(source)} images)"
    else:
        source, where = MemorySource(images), "in-memory synthetic 500x375 JPEGs"
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {where}; batch 64; {interpolation}")
    print("| workers | images/s wall | images/s per core |")
    print("|---|---|---|")
    for n, rate, per_core in bench_workers(cfg, source, workers, seconds):
        print(f"| {n} | {rate:.0f} | {per_core:.0f} |", flush=True)
    print(f"\n| host stage (500x375, full DeiT recipe, {interpolation}) | ms per image (CPU) |")
    print("|---|---|")
    for name, ms in stage_profile(images, cfg, 64):
        print(f"| {name} | {ms:.2f} |")


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
