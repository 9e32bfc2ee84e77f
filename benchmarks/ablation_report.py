"""Tables and figures of the Fashion-MNIST ablation (called by benchmarks/ablation.py)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bvit_jax.checkpoint import load_config, restore_params  # noqa: E402
from bvit_jax.metric_writers import read_metrics  # noqa: E402


def _name(preset: str, seed: int) -> str:
    return f"{preset.replace('+', '_')}_s{seed}"


def _final_eval(wd: Path) -> float:
    return read_metrics(wd, "eval")[-1]["top1"]


def _late_mean(rows: list[dict], key: str, frac: float = 0.2) -> float:
    """Mean of ``key`` over the rows in the last ``frac`` of training."""
    last = rows[-1]["step"]
    vals = [r[key] for r in rows if r["step"] > (1 - frac) * last and key in r]
    return float(np.mean(vals)) if vals else float("nan")


def _latent_over_alpha(wd: Path) -> np.ndarray:
    """All latent binary weights of a run's final checkpoint, each divided by its channel's alpha."""
    from bvit_jax.param_groups import flatten_with_paths

    _, params = restore_params(wd, "latest")
    out = []
    for path, w in flatten_with_paths(params):
        if path.endswith("linear/kernel") and path.startswith("blocks/"):
            w = np.asarray(w)
            out.append((w / np.abs(w).mean(axis=0, keepdims=True)).ravel())
    return np.concatenate(out)


def _sizes(wd: Path) -> dict:
    from flax import nnx

    from bvit_jax.models import create
    from bvit_jax.summary import summary

    cfg = load_config(wd)
    m = cfg["model"]
    model = nnx.eval_shape(lambda: create(m["variant"], m["preset"], num_classes=m["num_classes"],
                                          image_size=cfg["data"]["image_size"],
                                          in_channels=cfg["data"]["channels"], **m.get("overrides", {})))
    return summary(model).as_dict()


def write_report(out: Path, presets, seeds, docs: Path, *, split: str, machine: str) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    runs = {p: [out / _name(p, s) for s in seeds if (out / _name(p, s) / "metrics.jsonl").exists()] for p in presets}
    walls = json.loads((out / "wall_times.json").read_text()) if (out / "wall_times.json").exists() else {}
    lines = []
    table = ["| preset | top-1 (%) mean ± std | seeds | flip rate, last 20% | bimodality | act. entropy (bits) | size (paper / full, kB) | OPs (M) |",
             "|---|---|---|---|---|---|---|---|"]
    stats = {}
    for p, wds in runs.items():
        if not wds:
            continue
        acc = np.array([_final_eval(w) for w in wds]) * 100
        train_rows = [read_metrics(w, "train") for w in wds]
        diag_rows = [read_metrics(w, "diagnostics") for w in wds]
        flip = np.mean([_late_mean(r, "flip_rate/all") for r in train_rows])
        bim = np.mean([d[-1]["bimodality/mean"] for d in diag_rows if d]) if any(diag_rows) else float("nan")
        ent = np.mean([d[-1]["act_entropy/mean"] for d in diag_rows if d]) if any(diag_rows) else float("nan")
        size = _sizes(wds[0])
        stats[p] = dict(acc=acc, flip=flip, bim=bim, ent=ent)
        fmt = lambda v, f: "–" if not np.isfinite(v) else format(v, f)
        table.append(
            f"| `{p}` | {acc.mean():.2f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.2f} | {len(acc)} | "
            f"{fmt(flip, '.2e')} | {fmt(bim, '.3f')} | {fmt(ent, '.3f')} | "
            f"{size['size_bytes_paper'] / 1e3:.1f} / {size['size_bytes_full'] / 1e3:.1f} | {size['ops'] / 1e6:.2f} |"
        )
    lines += table
    (out / "results_table.md").write_text("\n".join(lines) + "\n")
    (out / "results_stats.json").write_text(json.dumps(
        {p: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()} for p, d in stats.items()}, indent=1))

    # Figures -------------------------------------------------------------------------
    pairs = [("baseline", "baseline+grs"), ("baseline+asm", "binaryvit")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, (a, b) in zip(axes, pairs):
        for p, color in ((a, "tab:blue"), (b, "tab:red")):
            if runs.get(p):
                ax.hist(_latent_over_alpha(runs[p][0]), bins=200, range=(-3, 3), histtype="step", color=color,
                        label=p, density=True)
        ax.set_xlabel("latent weight / alpha (per output channel)")
        ax.legend()
    axes[0].set_ylabel("density")
    fig.suptitle("Latent binary weights at the end of training (seed %d)" % seeds[0])
    fig.tight_layout()
    fig.savefig(docs / "fig_weight_histograms.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for p in presets:
        for i, wd in enumerate(runs.get(p, [])):
            rows = [r for r in read_metrics(wd, "train") if "flip_rate/all" in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r["flip_rate/all"] for r in rows], lw=1,
                        color=f"C{presets.index(p)}", alpha=0.8, label=p if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flip rate of sign(W) per step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(docs / "fig_flip_rate.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 3.5))
    width = 0.2
    for j, p in enumerate([p for p in presets if p != "fp"]):
        if not runs.get(p):
            continue
        d = read_metrics(runs[p][0], "diagnostics")[-1]
        layers = sorted(k[len("act_entropy/"):] for k in d if k.startswith("act_entropy/") and k != "act_entropy/mean")
        ax.bar(np.arange(len(layers)) + j * width, [d[f"act_entropy/{l}"] for l in layers], width, label=p)
    ax.set_xticks(np.arange(len(layers)) + 1.5 * width, layers, rotation=90, fontsize=6)
    ax.set_ylabel("entropy of sign input (bits)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "fig_activation_entropy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for p in presets:
        for i, wd in enumerate(runs.get(p, [])):
            rows = read_metrics(wd, "eval")
            ax.plot([r["step"] for r in rows], [100 * r["top1"] for r in rows], color=f"C{presets.index(p)}",
                    marker=".", lw=1, label=p if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{'validation' if split == 'val' else 'test'} top-1 (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(docs / "fig_accuracy.png", dpi=120)
    plt.close(fig)
    print("\n".join(lines))
    print(f"machine: {machine}; wall times (s): {json.dumps(walls)}")
