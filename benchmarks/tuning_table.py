r"""The tuning table of docs/results.md for finished study runs: one row per run folder.

    python benchmarks/tuning_table.py workdirs/validation/baseline_s0 workdirs/validation/binaryvit_s0 ...
    python benchmarks/tuning_table.py --json=out.json workdirs/validation/*_s0

Columns (from each run's ``metrics.jsonl``; the definitions of docs/results.md): the evaluation top-1 after
every third epoch (the eval rows nearest to ``k * total_steps / 5``) and at the end; the mean flip rate of
the last 20 % of the train rows; the last diagnostics row's bimodality of ``W / alpha`` and mean activation
entropy per channel and per token; at the end, the shares of latent weights never flipped since the warm-up,
silent (flip EMA below its threshold) and past the straight-through window. A run without diagnostics
(``fp``) shows "–" there. The split is the runs' own (their ``data.eval_split``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.ablation_report import END_SHARES, final_share, late_mean  # noqa: E402
from bvit_jax.train.metric_writers import read_metrics  # noqa: E402

CHECKPOINTS = 5  # top-1 after 1/5, 2/5, ... of training: epochs 3 / 6 / 9 / 12 / 15 of the 15-epoch students


def run_row(wd: Path) -> dict:
    """The table's values of one run folder (top-1 in %, shares in %)."""
    evals = read_metrics(wd, "eval")
    if not evals:
        raise SystemExit(f"{wd}: no eval rows in metrics.jsonl (not started, or not evaluated yet)")
    train = read_metrics(wd, "train")
    last = max(r["step"] for r in evals)
    marks = [round(k * last / CHECKPOINTS) for k in range(1, CHECKPOINTS + 1)]
    curve = [100 * min(evals, key=lambda r: abs(r["step"] - m))["top1"] for m in marks]
    diags = read_metrics(wd, "diagnostics")
    d = diags[-1] if diags else {}
    nan = float("nan")
    return {
        "run": wd.name,
        "steps": last,
        "top1_curve": curve,
        "top1": curve[-1],
        "flip_rate_late": late_mean(train, "flip_rate/all") if train and "flip_rate/all" in train[-1] else nan,
        "bimodality": d.get("bimodality/mean", nan),
        "entropy_channel": d.get("act_entropy/mean", nan),
        "entropy_token": d.get("act_token_entropy/mean", nan),
        **{name: final_share(train, key) for key, name in END_SHARES},
    }


def _cell(v: float, fmt: str) -> str:
    return "–" if not math.isfinite(v) else format(v, fmt)


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    shares = [name for _, name in END_SHARES]
    head = (
        "| run | top-1 (%) after each fifth of training | flip rate, last 20 % | bimodality "
        "| act. entropy per channel / per token (bits) | " + " | ".join(f"{s} (%)" for s in shares) + " |"
    )
    lines = [head, "|---" * (5 + len(shares)) + "|"]
    for r in rows:
        curve = " / ".join(f"{v:.2f}" for v in r["top1_curve"][:-1]) + f" / **{r['top1']:.2f}**"
        ent = f"{_cell(r['entropy_channel'], '.3f')} / {_cell(r['entropy_token'], '.3f')}"
        cells = [r["run"], curve, _cell(r["flip_rate_late"], ".2e"), _cell(r["bimodality"], ".3f"), ent]
        cells += [_cell(r[s], ".1f") for s in shares]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (train.py workdirs)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = [run_row(wd) for wd in args.runs]
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
