"""Pages of the documentation site written at build time (mkdocs-gen-files runs this file).

1. The reference: one page per registered method, model, merging method, estimator and front
   approach, from the registries, so a new one appears without editing the site. A method's page has
   its declared hyper-parameters (default, accepted values, meaning), its docstring (paper,
   defaults, departures from the official code) through mkdocstrings, and its measured cost copied
   from the committed tables (the step-cost benchmark and the suite's training times). Model,
   merging and estimator pages carry what the committed tables measured of them: parameters,
   training time and memory (architecture table, suites, M3ViT's costs), accuracy and merge time
   (merging tracks), fit time (estimator benchmark).
2. The repository files the hand-written pages link to (``../benchmarks/results/...``,
   ``../CONTRIBUTING.md``, ``../examples/...``) are copied under ``repo/`` and the links rewritten,
   so the site is self-contained and its link check (``mkdocs build --strict``) covers them.

``pages()`` returns ``{path in the site: markdown}`` and does the work; the tests call it directly.
"""

from __future__ import annotations

import functools
import json
import math
import posixpath
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
LINK = re.compile(r"(\]\()([^)#\s]+)((?:#[^)]*)?\))")
#: repository files a copied page may carry along (images and text the pages show or link)
COPIED = {".md", ".png", ".py", ".yaml", ".json", ".txt", ".svg"}


# -- 1. the reference --------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _step_costs() -> dict[str, dict[str, float]]:
    """``{method: {K: ms per step relative to one summed-loss backward}}`` from the committed
    step-cost table (one thread; trunk 256-512-512-256, batch 256)."""
    path = RESULTS / "step_cost_contracts.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    out: dict[str, dict[str, float]] = {}
    for k, rows in data.items():
        for name, row in rows.items():
            if name.startswith("mtlkit:"):
                out.setdefault(name.removeprefix("mtlkit:"), {})[k] = float(row["ratio"])
    return out


@functools.cache
def _suite_tables() -> list[tuple[str, dict[str, Any]]]:
    """``(report name, table)`` for every dataset x architecture table of the committed suite
    reports, read once per build."""
    tables = []
    for name in ("suite_quick", "suite_census", "suite_multi_mnist"):
        path = RESULTS / f"{name}.json"
        if path.is_file():
            tables += [(name, table) for table in json.loads(path.read_text()).get("tables", [])]
    return tables


def _suite_seconds() -> dict[str, dict[str, tuple[float, float]]]:
    """``{method: {dataset label: (its training seconds, EW's)}}`` from the committed suite reports."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name, table in _suite_tables():
        methods = table.get("methods", {})
        ew = methods.get("ew", {}).get("seconds", {}).get("mean")
        if ew is None:
            continue
        label = f"{table['dataset']}, {table['architecture']} ({name})"
        for method, row in methods.items():
            seconds = row.get("seconds", {}).get("mean")
            if seconds is not None:
                out.setdefault(method, {})[label] = (float(seconds), float(ew))
    return out


def _reference_block(cls: type) -> list[str]:
    """The mkdocstrings directive that renders ``cls``'s docstring (without its members)."""
    return [
        "## Reference",
        "",
        f"::: {cls.__module__}.{cls.__name__}",
        "    options:",
        "      members: false",
        "",
    ]


def _method_page(name: str, costs: dict[str, dict[str, float]], seconds: dict[str, Any]) -> str:
    from mtlkit.methods import GramianWeighting, JacobianAggregator, LossWeighting
    from mtlkit.methods.hparams import collect
    from mtlkit.methods.registry import method_class, variant_defaults

    cls = method_class(name)
    family = (
        "loss weighting (one backward)"
        if issubclass(cls, LossWeighting)
        else "Gramian weighting (per-task gradients)"
        if issubclass(cls, GramianWeighting)
        else "Jacobian aggregator (per-task gradients)"
        if issubclass(cls, JacobianAggregator)
        else "training scheme"
    )
    lines = [
        f"# `{name}`",
        "",
        f"`mk.methods.create({name!r})`: `{cls.__module__}.{cls.__name__}`, a {family}.",
        "",
    ]
    variant = variant_defaults(name)
    if variant:
        lines += [
            f"A registry variant of `{cls.__name__}` with "
            + ", ".join(f"`{k}={_fmt(v)}`" for k, v in variant.items())
            + ".",
            "",
        ]
    declared = {k: v for k, v in collect(cls).items() if v.config}
    if declared:
        lines += ["## Hyper-parameters", "", "| name | default | accepts | meaning |", "|---|---|---|---|"]
        for key, spec in declared.items():
            default = variant.get(key, spec.default)
            meaning = spec.doc.replace("|", "/")
            lines.append(f"| `{key}` | `{_fmt(default)}` | {spec.check.expected} | {meaning} |")
        lines.append("")
    lines += ["## Measured cost", ""]
    cost = costs.get(name)
    if cost:
        ratios = ", ".join(f"K={k}: {cost[k]:.2f}x" for k in sorted(cost, key=int))
        lines.append(
            f"- One training step relative to one backward of the summed losses ({ratios}), "
            "[step-cost table](../../repo/benchmarks/results/step_cost_contracts.md) (one thread)."
        )
    for label, (own, ew) in sorted(seconds.get(name, {}).items()):
        lines.append(f"- Training time on {label}: {own:.1f} s, against EW's {ew:.1f} s (mean over seeds).")
    if not cost and name not in seconds:
        lines.append("- Not in the committed cost tables yet.")
    lines += ["", *_reference_block(cls)]
    return "\n".join(lines)


def _merging_results() -> dict[str, list[str]]:
    """``{merging method: [result lines]}``: each configuration's average test accuracy and merge
    time on the merging tracks, from the committed track tables (mean over their seeds)."""
    import runpy
    import statistics

    script = ROOT / "benchmarks" / "merging_tracks.py"
    if not script.is_file():
        return {}
    names = {m.label: m.name for m in runpy.run_path(str(script), run_name="merging_tracks")["METHODS"]}
    out: dict[str, list[str]] = {}
    for table, track in (("merging_mlp8", "MLP-8"), ("merging_efficientnet_lite0", "EfficientNet-Lite0")):
        path = RESULTS / f"{table}.json"
        if not path.is_file():
            continue
        seeds = json.loads(path.read_text())["results"]
        for label, name in names.items():
            rows = [seed["rows"][label] for seed in seeds if label in seed["rows"]]
            if not rows:
                continue
            accuracy = statistics.mean(r["average"] for r in rows)
            seconds = statistics.mean(r["seconds"] for r in rows)
            out.setdefault(name, []).append(
                f"- {track} track, {label}: average test accuracy {accuracy:.1f}%, one merge {seconds:.2f} s "
                f"([{table}](../../repo/benchmarks/results/{table}.md), {len(rows)} seed(s), one thread)."
            )
    return out


NOT_MEASURED = ["- Not in the committed cost tables yet."]

# the architecture labels of the committed tables, by registry name
MODEL_LABELS = {
    "MultiLeNet": "lenet",
    "MLP 256-128": "shared_bottom",
    "SharedBottom": "shared_bottom",
    "MMoE": "mmoe",
    "CGC": "cgc",
    "PLE": "ple",
    "DSelect-k": "dselect_k",
    "HoME": "home",
}


def _model_results() -> dict[str, list[str]]:
    """``{model: [result lines]}``: parameters and training time from the committed architecture
    table, the suites (with equal weighting) and the M3ViT cost table."""
    import statistics

    out: dict[str, list[str]] = {}
    path = RESULTS / "census_architectures.json"
    if path.is_file():
        runs: dict[str, list[dict[str, Any]]] = {}
        for row in json.loads(path.read_text())["results"]:
            if row["kind"] == "mtl" and row["method"] == "EW" and row["label"] in MODEL_LABELS:
                runs.setdefault(row["label"], []).append(row)
        for label, rows in runs.items():
            per_epoch = statistics.mean(r["seconds"] / r["epochs"] for r in rows)
            out.setdefault(MODEL_LABELS[label], []).append(
                f"- Census-Income, {label} with EW: {rows[0]['params']:,} parameters, {per_epoch:.1f} s per epoch "
                f"([census_architectures](../../repo/benchmarks/results/census_architectures.md), "
                f"{len(rows)} seeds, two one-thread workers)."
            )
    for name, table in _suite_tables():
        model, ew = MODEL_LABELS.get(table["architecture"]), table["methods"].get("ew", {})
        if model is None or "seconds" not in ew:
            continue
        memory = ew.get("peak_memory_mib", {}).get("mean")
        out.setdefault(model, []).append(
            f"- {table['dataset']}, {table['architecture']} with EW: the whole training run "
            f"{ew['seconds']['mean']:.1f} s"
            + (f", peak memory its steps added {memory:.0f} MiB" if memory is not None else "")
            + f" ([{name}](../../repo/benchmarks/results/{name}.md), mean over {ew['seconds']['n']} seeds)."
        )
    path = RESULTS / "m3vit.json"
    if path.is_file():
        m3vit = json.loads(path.read_text())
        for case in m3vit["inference"]:
            if case["case"].startswith("M3ViT"):
                out.setdefault("m3vit", []).append(
                    f"- {case['case']}: {case['parameters']:,} parameters, {case['gflops']:.3f} GFLOPs per batch of 64, "
                    f"{case['flops_vs_dense_vit']:.3f} of a dense ViT's FLOPs, {case['ms']:.2f} ms on one CPU thread "
                    "([m3vit](../../repo/benchmarks/results/m3vit.md))."
                )
    return out


def _estimator_results() -> dict[str, list[str]]:
    """``{estimator: [result lines]}``: fit times from the committed estimator benchmark."""
    import statistics

    path = RESULTS / "estimators.json"
    if not path.is_file():
        return {}
    results = json.loads(path.read_text())
    times = {label: statistics.median(values) for label, values in results["speed"]["times"].items()}
    link = "([estimators](../../repo/benchmarks/results/estimators.md), median of three fits, one thread)"
    out: dict[str, list[str]] = {}
    for label, anchor, name, setting in (
        ("R-MTGB", "sklearn GB", "rmtgb_regressor", "on ILEA Exam's training split"),
        (
            "MTLComb path",
            "MultiTaskLasso path",
            "mtlcomb",
            "20 tasks x 100 samples x 200 features (not like for like)",
        ),
    ):
        ours = next((k for k in times if k.startswith(label)), None)
        theirs = next((k for k in times if k.startswith(anchor)), None)
        if ours is None or theirs is None:
            continue
        out[name] = [
            f"- {ours} {setting}: {times[ours]:.3f} s, {times[ours] / times[theirs]:.2f}x "
            f"{theirs} ({times[theirs]:.3f} s) {link}."
        ]
    tfcl = results.get("tfcl")
    if isinstance(tfcl, list) and tfcl:
        seconds = [seed[k]["seconds"] for seed in tfcl for k in seed if k.startswith("TFCL")]
        if seconds:
            out.setdefault("tfcl", []).append(
                f"- One fit with gamma chosen on validation: {statistics.median(seconds):.3f} s "
                f"(median over {len(seconds)} seeds) ([estimators](../../repo/benchmarks/results/estimators.md))."
            )
    return out


def _class_page(title: str, usage: str, cls: type, measured: list[str] | None = None) -> str:
    lines = [f"# `{title}`", "", f"{usage}: `{cls.__module__}.{cls.__name__}`.", ""]
    if measured:
        lines += ["## Measured", "", *measured, ""]
    lines += _reference_block(cls)
    return "\n".join(lines)


def reference_pages() -> dict[str, str]:
    import mtlkit as mk
    from mtlkit.estimators import ESTIMATORS
    from mtlkit.merging import MERGERS
    from mtlkit.models.base import MODELS
    from mtlkit.pareto import APPROACHES

    pages: dict[str, str] = {}
    costs, seconds = _step_costs(), _suite_seconds()
    sections: dict[str, list[str]] = {
        "methods": [],
        "models": [],
        "merging": [],
        "estimators": [],
        "fronts": [],
    }
    for name in mk.methods.available():
        pages[f"reference/methods/{name}.md"] = _method_page(name, costs, seconds)
        sections["methods"].append(name)
    model_results = _model_results()
    for name in MODELS.available():
        cls = MODELS.get(name)
        usage = f"`mk.models.create({name!r}, ...)`"
        pages[f"reference/models/{name}.md"] = _class_page(
            name, usage, cls, model_results.get(name, NOT_MEASURED)
        )
        sections["models"].append(name)
    merged = _merging_results()
    for name in MERGERS.available():
        cls = MERGERS.get(name)
        usage = f"`mk.merging.merge(pretrained, experts, {name!r})`"
        pages[f"reference/merging/{name}.md"] = _class_page(name, usage, cls, merged.get(name))
        sections["merging"].append(name)
    estimator_results = _estimator_results()
    for name in ESTIMATORS.available():
        cls = ESTIMATORS.get(name)
        pages[f"reference/estimators/{name}.md"] = _class_page(
            name, "A scikit-learn estimator", cls, estimator_results.get(name, NOT_MEASURED)
        )
        sections["estimators"].append(name)
    for name, spec in APPROACHES.items():
        model = (
            f"`{spec.model}` (one model for the front)" if spec.model else "one plain model per preference"
        )
        pages[f"reference/fronts/{name}.md"] = "\n".join(
            [
                f"# `{name}`",
                "",
                f"`mk.pareto.learn_front({name!r}, ...)`: {spec.paper}.",
                "",
                f"- model: {model}",
                f"- loss: the [`{spec.method}`](../methods/{spec.method}.md) method"
                + (
                    f" with {', '.join(f'`{k}={_fmt(v)}`' for k, v in spec.method_options.items())}"
                    if spec.method_options
                    else ""
                ),
                f"- preferences in training: {'Dir(' + _fmt(spec.alpha) + ') per step' if spec.alpha else 'fixed, one per model'}",
                "",
                "See [Pareto fronts](../../pareto.md).",
                "",
            ]
        )
        sections["fronts"].append(name)
    titles = {
        "methods": "Methods (loss weightings, gradient aggregators, schemes)",
        "models": "Models",
        "merging": "Merging methods",
        "estimators": "Estimators (scikit-learn)",
        "fronts": "Front-learning approaches",
    }
    index = [
        "# Reference",
        "",
        "One page per registered name, generated from the registries and docstrings.",
        "",
    ]
    for key, names in sections.items():
        index += [f"## {titles[key]}", ""]
        index += [f"- [`{n}`]({key}/{n}.md)" for n in names]
        index.append("")
    pages["reference/index.md"] = "\n".join(index)
    return pages


# -- 2. repository files the pages link to -------------------------------------------------------------
def _is_relative(target: str) -> bool:
    """A link to another file of the repository (not a URL, a mail address or a site-absolute path)."""
    return "://" not in target and not target.startswith(("mailto:", "/"))


def _links(text: str) -> Iterator[str]:
    for match in LINK.finditer(text):
        if _is_relative(match.group(2)):
            yield match.group(2)


def _site_path(repo_path: str) -> str:
    """Where a repository file lives in the site: docs pages as they are, the rest under repo/."""
    return repo_path.removeprefix("docs/") if repo_path.startswith("docs/") else f"repo/{repo_path}"


def _rewrite(text: str, repo_path: str) -> tuple[str, set[str]]:
    """``text`` (the file at ``repo_path``) with every relative link pointing at the target's place
    in the site; and the repository files it links to outside docs/."""
    here = posixpath.dirname(repo_path)
    site_here = posixpath.dirname(_site_path(repo_path))
    wanted: set[str] = set()

    def fix(match: re.Match[str]) -> str:
        target = match.group(2)
        if not _is_relative(target):
            return match.group(0)
        resolved = posixpath.normpath(posixpath.join(here, target))
        if resolved.startswith(".."):
            return match.group(0)
        if not resolved.startswith("docs/"):
            wanted.add(resolved)
        new = posixpath.relpath(_site_path(resolved), site_here or ".")
        return f"{match.group(1)}{new}{match.group(3)}"

    return LINK.sub(fix, text), wanted


def repository_pages(also: Iterable[str] = ()) -> dict[str, str | bytes]:
    """The docs pages with rewritten links, and every repository file reachable from them (and
    from the repository paths ``also``)."""
    out: dict[str, str | bytes] = {}
    queue: list[str] = list(also)
    for page in sorted(DOCS.glob("*.md")):
        repo_path = f"docs/{page.name}"
        text, wanted = _rewrite(page.read_text(), repo_path)
        out[page.name] = text
        queue += sorted(wanted)
    seen: set[str] = set()
    while queue:
        repo_path = queue.pop()
        if repo_path in seen:
            continue
        seen.add(repo_path)
        source = ROOT / repo_path
        if source.is_dir():
            readme = f"{repo_path}/README.md"
            if (ROOT / readme).is_file():
                queue.append(readme)
            continue
        if not source.is_file() or source.suffix not in COPIED:
            continue
        if source.suffix == ".md":
            text, wanted = _rewrite(source.read_text(), repo_path)
            out[_site_path(repo_path)] = text
            queue += sorted(wanted)
        elif source.suffix == ".png":
            out[_site_path(repo_path)] = source.read_bytes()
        else:
            out[_site_path(repo_path)] = source.read_text()
    return out


def pages() -> dict[str, str | bytes]:
    reference = reference_pages()
    linked = {
        posixpath.normpath(posixpath.join(posixpath.dirname(path), target)).removeprefix("repo/")
        for path, text in reference.items()
        for target in _links(text)
        if "repo/" in target
    }
    return {**repository_pages(sorted(linked)), **reference}


def _write() -> None:
    import mkdocs_gen_files

    for path, content in pages().items():
        mode = "wb" if isinstance(content, bytes) else "w"
        with mkdocs_gen_files.open(path, mode) as handle:
            handle.write(content)


if __name__ in {"__main__", "<run_path>"}:
    _write()
