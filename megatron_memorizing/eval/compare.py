"""Evaluations of several runs side by side: one table, one plot by position.

    python -m megatron_memorizing.eval.compare runs/eval/cmp-stdlib-1000/* --baseline nomemory \
        --out docs/img/cmp-stdlib-1000.png

Each argument is a directory written by `megatron-memorizing-eval` (its perplexity.json); its name
labels the run (with its parent folder's where two share a name). Every run is compared at its own
training condition (memory at the training size, or no memory for a model trained without); the
other conditions it was evaluated at (larger memories, memory disabled) get their own columns.
`--baseline` names the run the "vs baseline" column divides by; where several comparisons are
passed at once (one folder each, e.g. one per seed), each run is compared with the baseline of
its own folder, its twin:

    python -m megatron_memorizing.eval.compare runs/eval/cmp-seed{1,2}/{nomemory,memory1536} --baseline nomemory

Evaluations of several checkpoints of the same training runs also get a table (and with
--out-steps a plot) of perplexity over training steps, per run, and with --baseline each run's
change against its baseline's run at the same step: the gain as a curve over training.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from megatron_memorizing.cli_arguments import existing_folder, output_file
from megatron_memorizing.eval.perplexity_cli import (
    NO_MEMORY,
    bucket_end,
    draw_by_position,
    memory_label,
    plot_by_position,
)
from megatron_memorizing.eval.report import new_figure, run_labels, save_figure, table

Points = dict[str, list[tuple[int, float]]]  # per run, (training step, value) by step


def evaluation_folder(text: str) -> Path:
    """argparse type of a folder megatron-memorizing-eval --out wrote (it holds perplexity.json)."""
    path = existing_folder(text)
    if not (path / "perplexity.json").is_file():
        raise argparse.ArgumentTypeError(
            f"{path / 'perplexity.json'} does not exist: pass directories written by megatron-memorizing-eval --out"
        )
    return path


def load_evaluation(directory: Path) -> dict:
    return json.loads((directory / "perplexity.json").read_text())


def training_condition(evaluation: dict) -> str:
    size = evaluation["training_memory_size"]
    return memory_label(size) if size else NO_MEMORY


def condition_order(evaluations: dict[str, dict]) -> list[str]:
    """Memory sizes ascending, then no memory, then any other (the long-context reference)."""
    names = list(dict.fromkeys(name for e in evaluations.values() for name in e["results"]))
    sizes = sorted(int(name.split()[1].replace(",", "")) for name in names if name.startswith("memory "))
    others = [name for name in names if not name.startswith("memory ") and name != NO_MEMORY]
    return [memory_label(size) for size in sizes] + [NO_MEMORY] + others


def training_run(evaluation: dict) -> Path:
    """The training run an evaluated checkpoint belongs to (RUN/checkpoints/iter_N -> RUN)."""
    return Path(evaluation["checkpoint"]).parent.parent


def training_runs(evaluations: dict[str, dict]) -> dict[str, Path]:
    """The training runs of the evaluated checkpoints, by label."""
    paths = list(dict.fromkeys(training_run(e) for e in evaluations.values()))
    return dict(zip(run_labels(paths), paths))


def twins_of(paths: dict[str, Path], baselines: list[str]) -> dict[str, str]:
    """Each run's baseline: the one in its own folder (its twin in the same comparison, e.g. the same
    seed), else the only baseline there is. A baseline is its own; runs with neither are left out."""
    twins = {}
    for label, path in paths.items():
        own = [b for b in baselines if paths[b].parent == path.parent]
        if own or len(baselines) == 1:
            twins[label] = (own or baselines)[0]
    return twins


def run_of_each(evaluations: dict[str, dict], runs: dict[str, Path]) -> dict[str, str]:
    """The label of the training run each evaluation's checkpoint belongs to."""
    label = {path: run for run, path in runs.items()}
    return {name: label[training_run(e)] for name, e in evaluations.items()}


def over_training(evaluations: dict[str, dict], run_of: dict[str, str]) -> Points:
    """Per training run, (step, perplexity at its training condition), by step."""
    points: Points = {run: [] for run in dict.fromkeys(run_of.values())}
    for name, e in evaluations.items():
        points[run_of[name]].append((e["step"], e["results"][training_condition(e)]["perplexity"]))
    return {run: sorted(p) for run, p in points.items()}


def gains_over_training(runs: Points, twins: dict[str, str]) -> Points:
    """Per run with a baseline other than itself, (step, % change of perplexity against it at that step)."""
    gains = {}
    for run, twin in twins.items():
        if run != twin:
            base = dict(runs[twin])
            gains[run] = [(step, 100 * (ppl / base[step] - 1)) for step, ppl in runs[run] if step in base]
    return gains


def over_training_table(runs: Points, twins: dict[str, str]) -> str:
    steps = sorted({step for points in runs.values() for step, _ in points})
    perplexity = {run: dict(points) for run, points in runs.items()}
    gain = {run: dict(points) for run, points in gains_over_training(runs, twins).items()}
    rows = []
    for step in steps:
        cells = [f"{perplexity[run][step]:.3f}" if step in perplexity[run] else "" for run in runs]
        gains = [f"{gain[run][step]:+.2f}%" if step in gain[run] else "" for run in gain]
        rows.append([f"{step:,}", *cells, *gains])
    return table(["step", *runs, *(f"{run} vs {twins[run]}" for run in gain)], rows)


def plot_over_training(runs: Points, twins: dict[str, str], baseline: str | None, path: Path) -> Path:
    """Validation perplexity over training steps, per run; with a baseline, a second panel shows each
    other run's change against its baseline at the same step (the gain as a curve over training)."""
    gains = gains_over_training(runs, twins)
    figure, panels = new_figure(width=11.0 if gains else 7.0, columns=2 if gains else 1)
    perplexity_axes = panels[0] if gains else panels
    colors = {run: f"C{i}" for i, run in enumerate(runs)}  # a run has one colour in both panels
    for run, points in runs.items():
        perplexity_axes.plot([step for step, _ in points], [ppl for _, ppl in points], marker="o", label=run,
                             color=colors[run])
    perplexity_axes.set_xlabel("training step")
    perplexity_axes.set_ylabel("validation perplexity")
    perplexity_axes.set_title("validation perplexity over training")
    perplexity_axes.legend()
    if gains:
        gain_axes = panels[1]
        for run, points in gains.items():
            gain_axes.plot([step for step, _ in points], [gain for _, gain in points], marker="o", label=run,
                           color=colors[run])
        gain_axes.axhline(0.0, color="grey", linewidth=0.8)
        gain_axes.set_xlabel("training step")
        gain_axes.set_ylabel(f"perplexity vs {baseline} (%)")
        gain_axes.set_title(f"change against {baseline} at the same step")
        gain_axes.legend()
    return save_figure(figure, path)


def comparison_table(evaluations: dict[str, dict], twins: dict[str, str], baseline: str | None) -> str:
    conditions = condition_order(evaluations)

    def own(e: dict) -> float:
        return e["results"][training_condition(e)]["perplexity"]

    rows = []
    for run, e in evaluations.items():
        cells = [f"{e['results'][c]['perplexity']:.3f}" if c in e["results"] else "" for c in conditions]
        gain = f"{100 * (own(e) / own(evaluations[twins[run]]) - 1):+.2f}%" if run in twins else ""
        rows.append([run, f"{e['step']:,}", f"{e['training_memory_size']:,}" if e["training_memory_size"] else "none",
                     f"{own(e):.3f}", *cells, gain])
    return table(
        ["run", "step", "trained memory", "perplexity", *conditions, f"vs {baseline}" if baseline else ""], rows
    )


def position_table(evaluations: dict[str, dict]) -> str:
    """Perplexity by position in the document, each run at its training condition."""
    by_run = {run: {row["start"]: row for row in e["results"][training_condition(e)]["by_position"]}
              for run, e in evaluations.items()}
    starts = sorted(set.intersection(*(set(rows) for rows in by_run.values())))
    first = next(iter(by_run.values()))
    return table(["positions", "tokens", *evaluations],
                 [[f"{s}-{bucket_end(s) - 1}", f"{first[s]['tokens']:,.0f}",
                   *(f"{rows[s]['perplexity']:.3f}" for rows in by_run.values())]
                  for s in starts])


def plot(evaluations: dict[str, dict], twins: dict[str, str], path: Path, title: str) -> Path:
    """Each run at its training condition; runs trained without memory dashed. With a baseline, a
    second panel shows each other run's change against it by position: gains of a percent are
    invisible on the first panel's log scale."""
    curves = {
        run: ([(r["start"], r["perplexity"]) for r in e["results"][training_condition(e)]["by_position"]],
              not e["training_memory_size"])
        for run, e in evaluations.items()
    }
    if not twins:
        return plot_by_position(curves, path, title)
    figure, (perplexity_axes, change_axes) = new_figure(width=12.0, columns=2)
    draw_by_position(perplexity_axes, curves, title)
    for i, (run, (points, _)) in enumerate(curves.items()):
        if twins.get(run, run) == run:  # no baseline, or the baseline itself
            continue
        twin = dict(curves[twins[run]][0])
        changes = [(bucket_end(start), 100 * (ppl / twin[start] - 1)) for start, ppl in points
                   if start in twin and math.isfinite(ppl / twin[start])]
        change_axes.plot(*zip(*changes), marker="o", label=run, color=f"C{i}")
    change_axes.axhline(0.0, color="grey", linewidth=0.8)
    change_axes.set_xscale("log", base=2)
    change_axes.set_xlabel("position in the document (tokens, bucket end)")
    change_axes.set_ylabel("perplexity vs baseline (%)")
    change_axes.set_title(f"change against {next(iter(set(twins.values())))}" if len(set(twins.values())) == 1
                          else "change against each run's baseline")
    change_axes.legend()
    return save_figure(figure, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_memorizing.eval.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evaluations", nargs="+", type=evaluation_folder,
                        help="directories written by megatron-memorizing-eval --out")
    parser.add_argument("--baseline", help="the run (directory name) the others are compared with; where several "
                                           "folders are passed, the one in each run's own folder")
    parser.add_argument("--out", type=output_file, help="PNG of perplexity by position, one line per run (with "
                                                        "--baseline also each run's change against it)")
    parser.add_argument("--title", default="perplexity by position in the document")
    parser.add_argument("--out-steps", type=output_file,
                        help="PNG of perplexity over training steps, one line per training run (for evaluations "
                             "of several checkpoints of the same runs); with --baseline also each run's change "
                             "against it")
    args = parser.parse_args(argv)

    labels = run_labels(args.evaluations)
    evaluations = {label: load_evaluation(directory) for label, directory in zip(labels, args.evaluations)}
    data = {e["data"] for e in evaluations.values()}
    if len(data) > 1:
        parser.error(f"the evaluations are on different data ({', '.join(sorted(data))}): compare like with like")
    twins, run_twins = {}, {}
    runs = training_runs(evaluations)
    run_of = run_of_each(evaluations, runs)
    if args.baseline:
        folders = dict(zip(labels, args.evaluations))
        baselines = [label for label, folder in folders.items() if args.baseline in (label, folder.name)]
        if not baselines:
            parser.error(f"--baseline {args.baseline} is not one of the runs: {', '.join(evaluations)}")
        twins = twins_of(folders, baselines)
        run_twins = twins_of(runs, list(dict.fromkeys(run_of[b] for b in baselines)))
    print(f"on {data.pop()} ({next(iter(evaluations.values()))['results'][NO_MEMORY]['tokens']:,.0f} tokens)")
    print(comparison_table(evaluations, twins, args.baseline))
    print("\nperplexity by position in the document (each run at its training memory size)")
    print(position_table(evaluations))
    if args.out:
        print(f"\nwrote {plot(evaluations, twins, args.out, args.title)}")
    points = over_training(evaluations, run_of)
    if any(len(p) > 1 for p in points.values()):
        print("\nperplexity over training (each run at its training memory size)")
        print(over_training_table(points, run_twins))
        if args.out_steps:
            print(f"wrote {plot_over_training(points, run_twins, args.baseline, args.out_steps)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
