"""The ``mtlkit`` command line."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer

from mtlkit.errors import MtlkitError

app = typer.Typer(add_completion=False, help="mtlkit: multi-task learning on PyTorch.", no_args_is_help=True)


def _summary(obj: object, width: int = 100) -> str:
    """The first sentence of ``obj``'s docstring, on one line."""
    paragraph = (inspect.getdoc(obj) or "").split("\n\n")[0]
    text = " ".join(paragraph.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _list(registry) -> None:
    for name in registry.available():
        typer.echo(f"{name:<16} {_summary(registry.get(name))}")


@app.command()
def methods() -> None:
    """List the multi-task optimisation methods."""
    from mtlkit.methods import METHODS

    _list(METHODS)


@app.command()
def models() -> None:
    """List the multi-task architectures."""
    from mtlkit.models import MODELS

    _list(MODELS)


@app.command()
def datasets() -> None:
    """List the datasets."""
    from mtlkit.data import DATASETS

    _list(DATASETS)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML run configuration (see configs/).")],
    epochs: Annotated[int | None, typer.Option(help="Override trainer.epochs.")] = None,
    output: Annotated[str | None, typer.Option("--out", help="Override the output directory.")] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Override trainer.checkpoint_every (steps between checkpoints).")
    ] = None,
) -> None:
    """Train a model as configured, then evaluate it on the test split.

    The whole configuration (every key, value range, component name and option) is checked
    before any data is loaded. Started again with the same output directory, a killed run
    resumes from its last intact checkpoint. Under ``torchrun --nproc-per-node N --no-python
    mtlkit train CONFIG`` the model trains in DistributedDataParallel on N ranks, with
    ``data.batch_size`` as the global batch.
    """
    from mtlkit.train.config import check_components, load_config

    overrides: dict[str, object] = {}
    if epochs is not None:
        overrides["trainer.epochs"] = epochs
    if output is not None:
        overrides["output"] = output
    if checkpoint_every is not None:
        overrides["trainer.checkpoint_every"] = checkpoint_every
    cfg = load_config(config, overrides)
    check_components(cfg)
    from mtlkit.train.experiment import run

    result = run(cfg)
    if result.trainer.is_main:
        typer.echo(str(result.test))
        typer.echo(f"logs, checkpoints and test_report.json in {result.output}")
    from mtlkit.train.distributed import finish

    finish()


@app.command()
def estimators() -> None:
    """List the scikit-learn-style multi-task estimators."""
    from mtlkit.estimators import ESTIMATORS

    _list(ESTIMATORS)


@app.command()
def mergers() -> None:
    """List the model-merging methods."""
    from mtlkit.merging import MERGERS

    _list(MERGERS)


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="YAML merge configuration (mtlkit's or mergekit's).")],
    output: Annotated[
        str | None, typer.Option("--out", help="Override the output .safetensors path.")
    ] = None,
) -> None:
    """Merge fine-tuned models as configured and write the result as safetensors with a model card.

    mtlkit's format names ``method`` ({name, options}), ``pretrained``, ``experts`` ({name: path})
    and ``output``; a mergekit config (``merge_method``, ``base_model``, ``models``) for a
    data-free method is translated. Checkpoints are safetensors files or folders of shards.
    """
    from mtlkit.merging import merge as run_merge
    from mtlkit.merging.config import load_merge_config

    cfg = load_merge_config(config)
    for note in cfg.notes:
        typer.echo(f"note: {note}")
    result = run_merge(
        cfg.pretrained,
        cfg.experts,
        cfg.method,
        batchnorm=cfg.batchnorm,
        precision=cfg.precision,
        **cfg.options,
    )
    path = result.save(output or cfg.output)
    typer.echo(
        f"{cfg.method} merge of {len(cfg.experts)} experts in {result.seconds:.1f} s: {path} (card {path.with_suffix('.md')})"
    )


@app.command()
def bench(
    suite_file: Annotated[Path, typer.Argument(help="YAML suite (see benchmarks/suites/).")],
    workers: Annotated[int | None, typer.Option(help="Parallel processes (overrides the suite's).")] = None,
    output: Annotated[str | None, typer.Option("--out", help="Override the suite's output folder.")] = None,
    report: Annotated[
        Path | None, typer.Option(help="Also write the report here (Markdown; .json and plots beside it).")
    ] = None,
    report_only: Annotated[bool, typer.Option(help="Report the stored results; train nothing.")] = False,
) -> None:
    """Run a benchmark suite: methods x architectures x datasets x seeds against stored single-task
    baselines, then write its report (tables with 95% intervals, ranks, plots).

    Finished runs are stored and skipped when the suite is run again; an interrupted run resumes
    from its last checkpoint. The report goes to OUTPUT/report-NAME.md (and --report).
    """
    import shlex
    import sys
    import time

    from mtlkit.bench.suite import collect_results, run_suite
    from mtlkit.bench.suite_config import load_suite
    from mtlkit.bench.suite_report import write_report

    suite = load_suite(suite_file)
    if output is not None:
        suite.output = output
    if workers is not None:
        if workers < 1:
            raise typer.BadParameter("--workers must be >= 1")
        suite.workers = workers
    start = time.perf_counter()
    trained = None
    if not report_only:
        ran = run_suite(suite, log=typer.echo)
        trained = sum(1 for r in ran.values() if not r.get("reused") and "error" not in r)
    wall = None if report_only else time.perf_counter() - start
    command = "mtlkit bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    for path in write_report(suite, collect_results(suite), command, wall, report, trained):
        typer.echo(f"wrote {path}")


@app.command()
def affinity(
    config: Annotated[Path, typer.Argument(help="YAML run configuration with an affinity: section.")],
    output: Annotated[str | None, typer.Option("--out", help="Override the output directory.")] = None,
    train_groups: Annotated[
        bool | None, typer.Option(help="Train the suggested groups against all-in-one and single-task.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Override trainer.epochs.")] = None,
) -> None:
    """Measure task relatedness (TAG, gradient cosines, cross-loss similarity, MTIF) in one
    all-in-one run, choose task groups, and optionally train them against all-in-one and
    single-task training.

    Writes affinity.json, affinity.md and affinity.png (heat maps) to the output directory.
    """
    from mtlkit.relatedness.affinity_config import load_affinity_config

    job = load_affinity_config(config)
    if output is not None:
        job.run.output = output
    if train_groups is not None:
        job.affinity.train_groups = train_groups
    if epochs is not None:
        if epochs < 0:
            raise typer.BadParameter("--epochs must be >= 0")
        job.run.trainer.epochs = epochs
    from mtlkit.relatedness.affinity_job import run_affinity

    result, paths = run_affinity(job, log=typer.echo)
    for measure, groups in result.groups.items():
        typer.echo(f"{measure} groups: " + ", ".join("{" + ", ".join(g) + "}" for g in groups))
    for path in paths:
        typer.echo(f"wrote {path}")


@app.command()
def audit(
    config: Annotated[Path, typer.Argument(help="YAML audit configuration (see benchmarks/audit/).")],
    output: Annotated[str | None, typer.Option("--out", help="Override the output directory.")] = None,
    seeds: Annotated[
        list[int] | None, typer.Option("--seed", help="Override the seeds (repeatable).")
    ] = None,
) -> None:
    """Attack merged models by transfer: adversarial images crafted on each task's expert (FGSM,
    PGD, MI-, DI-, TI-, VMI-FGSM) against every configured merge of a merging track; reports clean
    accuracy, representation bias and relative transfer success, and tests the three insights of
    "Merge Now, Regret Later". Writes audit.md and audit.json to the output directory.
    """
    import shlex
    import sys

    from mtlkit.bench.merging_audit import load_audit_config, run_audit

    cfg = load_audit_config(config)
    if output is not None:
        cfg.output = output
    if seeds:
        cfg.seeds = list(seeds)
    command = "mtlkit audit " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    for path in run_audit(cfg, command, log=typer.echo):
        typer.echo(f"wrote {path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/demo"),
    epochs: Annotated[int, typer.Option(help="Epochs per run.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of every run.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """MMoE on Census-Income: EW, MGDA and MGDA-UB against single-task baselines (AUC, Δm%)."""
    from mtlkit.cli.demo import run_demo

    typer.echo(run_demo(out, epochs=epochs, seed=seed, progress=progress))


def main() -> None:
    """Entry point: mtlkit errors print as one clear line and exit with status 2."""
    try:
        app()
    except MtlkitError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
