"""The device half of the input pipeline: ``uint8`` host batches -> float model batches, jit-able.

The host pipeline (`pipeline.create_train_iterator`, and
`pipeline.create_eval_iterator` / `pipeline.EvalPasses` with
``normalize=False``) stops at ``uint8`` images (a quarter of the bytes of
float32) and integer labels. `DevicePreprocess` does the rest inside the
jitted step, on the accelerator:

train (``prep(batch, key)``; one ``key`` per step, `DevicePreprocess.key`):

1. normalise ``x = (pixel / 255 - mean) / std`` per channel, computed as
   ``pixel * (1 / (255 std)) + (-mean / std)`` with the float32 constants of
   the host's `eval_transform.Normalize`. The host rounds the product, then the
   sum; XLA may fuse the two into one multiply-add (one rounding; it does on
   CPU), so the device result is the host's or differs from it by at most
   ``u (2 |x| + |pixel * scale|)`` with ``u = 2^-24`` (one product rounding
   plus the two sum roundings), i.e. within 1-2 float32 ulps;
2. random erasing (Zhong et al. 2020; timm's ``RandomErasing``,
   ``mode='pixel'``, one box) with probability ``random_erase_prob``;
3. Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) over the batch
   (timm's ``Mixup``, batch mode): example ``i`` is mixed with ``B - 1 - i``
   with one ``lambda`` per batch (`mix_batch`);
4. targets ``lam * smooth(y) + (1 - lam) * smooth(y[::-1])``,
   ``smooth(y) = (1 - s) onehot(y) + s / K``; ``label_index`` the dominant
   label.

eval (``prep(batch)``): step 1, and zeros where ``mask`` is False (as the
host's eval batches), labels unchanged.

The randomness of steps 2-3 is ``jax.random`` keyed by
``fold_in(key(seed'), step)`` (`DevicePreprocess.key`), so a step's images are
a function of (config, seed, step, the uint8 batch): runs are deterministic
and a resumed run repeats them bit for bit. With the global batch sharded
over devices the ops are the same (JAX's partitionable threefry gives the
same random bits for any sharding); ``x[::-1]`` is the global batch reversed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from bvit_jax.data.config import channel_vector


def normalize(images: jax.Array, scale, offset) -> jax.Array:
    """``uint8 [..., C]`` -> float32 ``x * scale + offset`` (``scale = 1 / (255 std)``,
    ``offset = -mean / std``, float32 per channel): ``(x / 255 - mean) / std``
    (see the module docstring for its rounding against the host's)."""
    x = jnp.asarray(images).astype(jnp.float32)
    return x * jnp.asarray(scale, jnp.float32) + jnp.asarray(offset, jnp.float32)


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """``(1 - s) * onehot + s / K`` in float32: on-value ``float32(1 - s + s/K)``, off ``float32(s/K)``
    (constants computed in float64, as the host's ``mixup.smooth_one_hot``)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    hot = jnp.arange(num_classes) == jnp.asarray(labels)[:, None]
    return jnp.where(hot, jnp.float32(on), jnp.float32(off))


def _box_mask(height: int, width: int, top, bottom, left, right) -> jax.Array:
    """``[B, H, W, 1]`` True inside rows ``[top, bottom)`` and columns ``[left, right)`` (per example)."""
    rows = jnp.arange(height)[None, :]
    cols = jnp.arange(width)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < bottom[:, None])
    in_cols = (cols >= left[:, None]) & (cols < right[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :])[..., None]


def random_erasing(
    x: jax.Array,
    key: jax.Array,
    prob: float,
    area=(0.02, 1 / 3),
    ratio=(0.3, 1 / 0.3),
    tries: int = 10,
) -> jax.Array:
    """Random Erasing (Zhong et al. 2020), timm's ``mode='pixel'``, one box per image, on float ``[B, H, W, C]``.

    Per image, with probability `prob`: of `tries` candidate boxes of area
    ``H W U(area)`` and aspect ``exp(U(log ratio))``, ``h = round(sqrt(a *
    aspect))``, ``w = round(sqrt(a / aspect))``, the first with ``h < H`` and
    ``w < W`` is placed at a uniform position (``top = floor(U * (H - h +
    1))``) and filled with N(0, 1) per pixel and channel (the image is
    normalised, so the noise has the data's scale); no box if none fits.
    """
    if prob <= 0:
        return x
    b, height, width, _ = x.shape
    k_apply, k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(key, 6)
    apply = jax.random.uniform(k_apply, (b,)) < prob
    target = height * width * jax.random.uniform(k_area, (b, tries), minval=area[0], maxval=area[1])
    aspect = jnp.exp(jax.random.uniform(k_aspect, (b, tries), minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
    h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (w < width) & (h < height)
    first = jnp.argmax(fits, axis=1)
    h = jnp.take_along_axis(h, first[:, None], 1)[:, 0]
    w = jnp.take_along_axis(w, first[:, None], 1)[:, 0]
    apply &= jnp.any(fits, axis=1)
    top = jnp.floor(jax.random.uniform(k_top, (b,)) * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left, (b,)) * (width - w + 1)).astype(jnp.int32)
    inside = _box_mask(height, width, top, top + h, left, left + w) & apply[:, None, None, None]
    return jnp.where(inside, jax.random.normal(k_noise, x.shape, jnp.float32), x)


def mix_batch(
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    mix_prob: float = 1.0,
    switch_prob: float = 0.5,
    smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch Mixup / CutMix (timm's ``Mixup``, ``mode='batch'``) -> ``(images, soft_labels, label_index)``.

    With probability `mix_prob` the batch is mixed: CutMix with probability
    `switch_prob` when both alphas are > 0 (else the one that is on),
    ``lam ~ Beta(alpha, alpha)``. Mixup: ``x = x[::-1] + lam (x - x[::-1])``
    (``= lam x + (1 - lam) x[::-1]``). CutMix: the box of sides
    ``int(H sqrt(1 - lam))``, ``int(W sqrt(1 - lam))`` centred at a uniform
    pixel ``(cy, cx)``, clipped to the image (``y0 = clip(cy - cut_h // 2)``,
    ``y1 = clip(cy + cut_h // 2)``), is pasted from ``x[::-1]`` and
    ``lam = 1 - box_area / (H W)`` (timm's ``correct_lam``). Targets
    ``lam * smooth(y) + (1 - lam) * smooth(y[::-1])``; ``label_index`` is
    ``y`` where ``lam >= 0.5``, else ``y[::-1]``. An unmixed batch keeps its
    images bit for bit and gets ``smooth(y)``.
    """
    labels = jnp.asarray(labels, jnp.int32)
    targets = smooth_one_hot(labels, num_classes, smoothing)
    if not (mixup_alpha > 0 or cutmix_alpha > 0) or mix_prob <= 0:
        return x, targets, labels
    b, height, width = x.shape[:3]
    k_mix, k_switch, k_mixup, k_cutmix, k_cy, k_cx = jax.random.split(key, 6)
    mixed = jax.random.uniform(k_mix) < mix_prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    rev = x[::-1]
    lam = jnp.float32(1.0)
    out = x
    if mixup_alpha > 0:
        lam_mixup = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha).astype(jnp.float32)
        out_mixup = rev + lam_mixup * (x - rev)
        lam, out = lam_mixup, out_mixup
    if cutmix_alpha > 0:
        lam_c = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha).astype(jnp.float32)
        cut = jnp.sqrt(1.0 - lam_c)
        cut_h = (height * cut).astype(jnp.int32)
        cut_w = (width * cut).astype(jnp.int32)
        cy = jax.random.randint(k_cy, (), 0, height)
        cx = jax.random.randint(k_cx, (), 0, width)
        y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
        x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
        box = _box_mask(height, width, *(jnp.full((1,), v) for v in (y0, y1, x0, x1)))
        out_cutmix = jnp.where(box, rev, x)
        lam_cutmix = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / jnp.float32(height * width)
        lam = jnp.where(use_cutmix, lam_cutmix, lam)
        out = jnp.where(use_cutmix, out_cutmix, out)
    lam = jnp.where(mixed, lam, jnp.float32(1.0))
    out = jnp.where(mixed, out, x)
    soft = targets * lam + targets[::-1] * (jnp.float32(1.0) - lam)
    soft = jnp.where(mixed, soft, targets)
    index = jnp.where(lam >= 0.5, labels, labels[::-1])
    del b
    return out, soft, index


@dataclasses.dataclass(frozen=True)
class DevicePreprocess:
    """The device half of a data config's pipeline: ``prep(batch, key)`` (train) / ``prep(batch)`` (eval).

    Built with :meth:`from_config`; hashable, so it can be closed over in a
    jitted function. See the module docstring for the steps and formulas.

    ``batch``: a host batch as the pipeline yields it, ``image`` ``uint8
    [B, H, W, C]`` and ``label`` int ``[B]`` (train), plus ``mask`` bool
    ``[B]`` (eval). Returns a new dict: train ``image`` float32, ``label``
    float32 ``[B, K]`` soft targets (rows sum to 1), ``label_index`` int32
    ``[B]``; eval ``image`` float32 (zeros where masked) and the other
    entries as given. Images already of a float dtype are taken as
    normalised (not rescaled); a train batch whose ``label`` is already
    ``[B, K]`` is returned unchanged (a batch prepared by hand).
    """

    scale: tuple  # float32 per channel, 1 / (255 std)
    offset: tuple  # float32 per channel, -mean / std
    num_classes: int
    seed: int
    random_erase_prob: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, config, num_classes: int, seed: int = 0) -> DevicePreprocess:
        """From a data config (``mean``, ``std``, ``channels``, ``random_erase_prob``, ``mixup_alpha``,
        ``cutmix_alpha``, ``mix_prob``, ``mix_switch_prob``, ``label_smoothing``); `seed` is the run's."""
        channels = int(config.channels)
        mean, std = channel_vector(config.mean, channels), channel_vector(config.std, channels)
        # The same float32 constants as the host's eval_transform.Normalize.
        scale = (1.0 / (255.0 * std)).astype(np.float32)
        offset = (-mean / std).astype(np.float32)
        return cls(
            scale=tuple(float(v) for v in scale),
            offset=tuple(float(v) for v in offset),
            num_classes=int(num_classes),
            seed=int(np.random.SeedSequence([int(seed), 3]).generate_state(1)[0] >> 1),
            random_erase_prob=float(config.random_erase_prob),
            mixup_alpha=float(config.mixup_alpha),
            cutmix_alpha=float(config.cutmix_alpha),
            mix_prob=float(config.mix_prob),
            mix_switch_prob=float(config.mix_switch_prob),
            label_smoothing=float(config.label_smoothing),
        )

    def key(self, step) -> jax.Array:
        """The train key of step `step` (an int or int array): ``fold_in(key(seed'), step)``,
        ``seed'`` derived from the run's seed."""
        return jax.random.fold_in(jax.random.key(self.seed), jnp.asarray(step, jnp.uint32))

    def __call__(self, batch: dict, key: jax.Array | None = None) -> dict:
        """The float batch of host batch `batch`: train with `key`, eval without (see the class)."""
        out = dict(batch)
        image = jnp.asarray(batch["image"])
        if key is None:
            if not jnp.issubdtype(image.dtype, jnp.floating):
                image = normalize(image, np.asarray(self.scale, np.float32), np.asarray(self.offset, np.float32))
                if "mask" in batch:
                    image = jnp.where(jnp.asarray(batch["mask"])[:, None, None, None], image, jnp.float32(0.0))
            out["image"] = image
            return out
        if jnp.ndim(batch["label"]) == 2:
            return out
        if not jnp.issubdtype(image.dtype, jnp.floating):
            image = normalize(image, np.asarray(self.scale, np.float32), np.asarray(self.offset, np.float32))
        image = image.astype(jnp.float32)
        k_erase, k_mix = jax.random.split(key)
        image = random_erasing(image, k_erase, self.random_erase_prob)
        image, soft, index = mix_batch(
            image,
            batch["label"],
            k_mix,
            num_classes=self.num_classes,
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            mix_prob=self.mix_prob,
            switch_prob=self.mix_switch_prob,
            smoothing=self.label_smoothing,
        )
        out.update(image=image, label=soft, label_index=index)
        return out
