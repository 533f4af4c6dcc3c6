"""Training curves of several runs side by side, from their tensorboard logs.

    python -m megatron_memorizing.eval.curves runs/cmp-stdlib-1000/* --scalar train/loss --smooth 10 \
        --out docs/img/cmp-stdlib-1000-loss.png

Each argument is a run's logging directory (`logging.dir`); its name labels the run (with its
parent folder's where two runs share a name). Prints the scalar of every run at a few common
steps and plots the whole curves. `--smooth N` averages the
last N logged values (training loss is noisy: each step is one segment of a few documents).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_memorizing.cli_arguments import existing_folder, output_file, positive_int
from megatron_memorizing.eval.report import new_figure, run_labels, save_figure, table


def read_scalar(directory: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar; a value logged twice at a step (a resumed run) keeps the last."""
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        known = ", ".join(sorted(events.Tags()["scalars"])) or "none: is this a logging.dir?"
        raise LookupError(f"{directory} has no scalar '{tag}' (it has: {known})")
    return sorted({event.step: event.value for event in events.Scalars(tag)}.items())


def smoothed(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Trailing mean over `window` logged values."""
    values = [v for _, v in points]
    windows = (values[max(0, i - window + 1): i + 1] for i in range(len(values)))
    return [(step, sum(w) / len(w)) for (step, _), w in zip(points, windows)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_memorizing.eval.curves", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=existing_folder, help="logging directories of the runs")
    parser.add_argument("--scalar", default="train/loss", help="tensorboard tag (e.g. validation/perplexity)")
    parser.add_argument("--smooth", type=positive_int, default=1, help="trailing mean over this many logged values")
    parser.add_argument("--rows", type=positive_int, default=6, help="common steps to print")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    parser.add_argument("--out", type=output_file, help="PNG of the curves")
    args = parser.parse_args(argv)

    labels = run_labels(args.runs)
    try:
        curves = {label: smoothed(read_scalar(run, args.scalar), args.smooth) for label, run in zip(labels, args.runs)}
    except LookupError as error:
        parser.error(f"--scalar {args.scalar}: {error}")
    common = sorted(set.intersection(*({step for step, _ in points} for points in curves.values())))
    if not common:
        parser.error(f"the runs logged '{args.scalar}' at no common step")
    shown = sorted({common[round(i * (len(common) - 1) / max(1, args.rows - 1))] for i in range(args.rows)})
    values = {run: dict(points) for run, points in curves.items()}
    title = args.scalar + (f" (mean of {args.smooth} logged values)" if args.smooth > 1 else "")
    print(title)
    print(table(["step", *curves], [[f"{step:,}", *(f"{values[run][step]:.4f}" for run in curves)] for step in shown]))
    if args.out:
        figure, axes = new_figure()
        for run, points in curves.items():
            axes.plot([s for s, _ in points], [v for _, v in points], label=run,
                      marker="o" if len(points) < 30 else None)
        if args.log_y:
            axes.set_yscale("log")
        axes.set_xlabel("step")
        axes.set_ylabel(args.scalar)
        axes.set_title(title)
        axes.legend()
        print(f"wrote {save_figure(figure, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
