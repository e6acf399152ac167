"""``mtlkit audit CONFIG.yaml``: transfer attacks against merged models on a merging track.

A config names the track (``mlp8`` or ``efficientnet_lite0``, :mod:`mtlkit.bench.merging_track`),
seeds, the merges to audit, the attacks and budgets::

    track: mlp8
    seeds: [0]
    output: runs/audit
    images: 200                     # test images per task that are attacked
    attacks: [fgsm, pgd, mi_fgsm, di_fgsm, ti_fgsm, vmi_fgsm]
    budgets: [0.0156863, 0.0313725] # 4/255 and 8/255
    methods:
      - {label: weight averaging, name: average}
      - {label: Task Arithmetic, name: task_arithmetic, scaling: search}   # chosen on validation
      - {label: RegMean, name: regmean, data: inputs}                      # training inputs
      - {label: AdaMerging, name: adamerging, data: test_time}             # validation inputs

Each task's expert (its fine-tuned backbone with the task's frozen head) is the surrogate; every
merge is a target. The report gives, per merge, clean accuracy, representation bias and the
relative transfer success (per attack and overall), and tests the paper's three insights: stronger
merges more vulnerable (rank correlation of accuracy and relative success > 0), less representation
bias more vulnerable (rank correlation of bias and relative success < 0), weight averaging the most
vulnerable.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtlkit.bench.merging_track import SCALING_GRID, backbone_state, efficientnet_lite0_track, mlp8_track
from mtlkit.core.yaml_files import read_yaml_mapping
from mtlkit.errors import ConfigError, unknown_name
from mtlkit.merging import MERGERS, merge, select_scaling
from mtlkit.merging.attacks import ATTACKS
from mtlkit.merging.audit import representation_bias, spearman, summarise, transfer_audit

TRACKS = ("mlp8", "efficientnet_lite0")
DATA = ("inputs", "test_time")
KEYS = {"track", "seeds", "output", "images", "attacks", "budgets", "methods"}


@dataclass
class AuditMethod:
    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    scaling: float | str | None = None  # a value, "search" (validation) or None (the method's own)
    data: str | None = None  # "inputs" (training inputs: RegMean) or "test_time" (validation inputs)


@dataclass
class AuditConfig:
    methods: list[AuditMethod]
    track: str = "mlp8"
    seeds: list[int] = field(default_factory=lambda: [0])
    output: str = "runs/audit"
    images: int = 200
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    budgets: list[float] = field(default_factory=lambda: [4 / 255, 8 / 255])


def load_audit_config(path: str | Path) -> AuditConfig:
    raw = read_yaml_mapping(Path(path))
    unknown = set(raw) - KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; expected {sorted(KEYS)}.")
    if not isinstance(raw.get("methods"), list) or not raw["methods"]:
        raise ConfigError(f"{path}: methods must be a non-empty list of {{label, name, ...}}.")
    methods = []
    for item in raw["methods"]:
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"{path}: each method needs a name, got {item!r}.")
        extra = set(item) - {"label", "name", "options", "scaling", "data"}
        if extra:
            raise ConfigError(f"{path}: unknown method key(s) {sorted(extra)}.")
        method = AuditMethod(
            str(item.get("label", item["name"])),
            MERGERS.normalise(str(item["name"])),
            dict(item.get("options") or {}),
            item.get("scaling"),
            item.get("data"),
        )
        if method.data is not None and method.data not in DATA:
            raise unknown_name("data", method.data, DATA)
        if isinstance(method.scaling, str) and method.scaling != "search":
            raise ConfigError(f"{path}: scaling is a number or 'search', got {method.scaling!r}.")
        methods.append(method)
    cfg = AuditConfig(methods, **{k: raw[k] for k in KEYS - {"methods"} if k in raw})
    if cfg.track not in TRACKS:
        raise unknown_name("track", cfg.track, TRACKS)
    for a in cfg.attacks:
        if a not in ATTACKS:
            raise unknown_name("attack", a, list(ATTACKS))
    if cfg.images < 1 or not cfg.budgets or any(not 0 < b <= 1 for b in cfg.budgets) or not cfg.seeds:
        raise ConfigError(f"{path}: need images >= 1, budgets in (0, 1] and at least one seed.")
    labels = [m.label for m in cfg.methods]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{path}: method labels must be unique, got {labels}.")
    return cfg


def merge_on_track(
    track: Any, method: AuditMethod
) -> tuple[Callable[[str], dict[str, Tensor]], float | None]:
    """The merged backbone state per task (one state for every task, except task-routed EMR) and the
    scaling used (chosen on validation for ``search``)."""
    options = dict(method.options)
    chosen = None
    if method.scaling == "search":  # data-free methods: the search keeps its best merge
        found = select_scaling(
            track.pretrained,
            track.experts,
            method.name,
            track.validation_score,
            values=SCALING_GRID,
            **options,
        )
        chosen, result = found.best, found.result
    else:
        if method.scaling is not None:
            chosen = options["scaling"] = float(method.scaling)
        if method.data == "test_time":  # the validation split's inputs, never the test split
            headed = {t: track.headed(s) for t, s in track.experts.items()}
            data = {t: track.validation_batches(t) for t in track.experts}
            whole = merge(track.headed(track.pretrained), headed, method.name, data=data, **options)
            state = backbone_state(whole.state_dict)
            return (lambda t: state), chosen
        if method.data == "inputs":  # training inputs
            options["data"] = {t: track.batches(t) for t in track.experts}
            options["model"] = track.make_backbone()
        result = merge(track.pretrained, track.experts, method.name, **options)
    if "modulators" in result.extras:
        return result.for_task, chosen
    return (lambda t: result.state_dict), chosen


def audit_seed(
    cfg: AuditConfig, seed: int, log: Callable[[str], None] = print, build: Callable[[int], Any] | None = None
) -> dict[str, Any]:
    """One seed's audit; ``build(seed)`` makes the track (default: the configured one)."""
    torch.set_num_threads(1)
    if build is None:
        build = mlp8_track if cfg.track == "mlp8" else efficientnet_lite0_track
    track = build(seed)
    data = {
        t: (task.test.images[: cfg.images], task.test.labels[: cfg.images]) for t, task in track.tasks.items()
    }
    experts = {t: track.backbone(s) for t, s in track.experts.items()}
    surrogates = {t: (lambda x, t=t, e=experts[t]: track.heads[t](e(x))) for t in track.tasks}
    targets, summary = {}, {}
    for method in cfg.methods:
        log(f"seed {seed}: {method.label}")
        start = time.perf_counter()
        state_for, scale = merge_on_track(track, method)
        backbones = {t: track.backbone(state_for(t)) for t in track.tasks}
        # each model bound now: a late-bound loop variable would give every merge the last one's backbones
        targets[method.label] = {
            t: (lambda x, t=t, b=backbones[t]: track.heads[t](b(x))) for t in track.tasks
        }
        accuracy = track.accuracy(state_for)
        bias = statistics.mean(representation_bias(backbones[t], experts[t], data[t][0]) for t in track.tasks)
        summary[method.label] = {
            "accuracy": statistics.mean(accuracy.values()),
            "representation_bias": bias,
            "scaling": scale,
            "merge_seconds": time.perf_counter() - start,
        }
    log(f"seed {seed}: attacks")
    rows = transfer_audit(surrogates, targets, data, cfg.attacks, cfg.budgets, seed=seed)
    for label, value in summarise(rows).items():
        summary[label]["relative_transfer"] = value
    return {"seed": seed, "rows": rows, "summary": summary}


def insights(seeds: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    def mean_of(key: str) -> list[float]:
        return [statistics.mean(s["summary"][label][key] for s in seeds) for label in labels]

    accuracy, bias, relative = (
        mean_of("accuracy"),
        mean_of("representation_bias"),
        mean_of("relative_transfer"),
    )
    out: dict[str, Any] = {"most_vulnerable": labels[max(range(len(labels)), key=relative.__getitem__)]}
    if len(labels) >= 3:
        out["accuracy_vs_transfer"] = spearman(accuracy, relative)
        out["bias_vs_transfer"] = spearman(bias, relative)
    return out


def verdict(rho: float, sign: int, critical: float) -> str:
    """``holds`` when rho has the expected sign beyond the 5% critical value, else how it fails."""
    if sign * rho > critical:
        return f"holds: beyond the 5% critical value {critical:.2f}"
    if sign * rho > 0:
        return f"the expected sign, but within the 5% critical value {critical:.2f}: not shown"
    return "the opposite sign: not reproduced"


def report(cfg: AuditConfig, seeds: list[dict[str, Any]], command: str) -> str:
    labels = [m.label for m in cfg.methods]

    def cell(label: str, key: str, fmt: str) -> str:
        values = [s["summary"][label][key] for s in seeds]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"

    def per_attack(label: str, name: str) -> str:
        values = [
            r["relative_transfer"]
            for s in seeds
            for r in s["rows"]
            if r["target"] == label
            and r["attack"] == name
            and r["relative_transfer"] == r["relative_transfer"]
        ]
        return f"{statistics.mean(values):.3f}" if values else "n/a"

    budgets = ", ".join(f"{b * 255:.0f}/255" for b in cfg.budgets)
    lines = [
        f"# Transfer attacks on merged models: {cfg.track} track",
        "",
        f"`{command}` (seeds {cfg.seeds}, {cfg.images} test images per task, budgets {budgets}; one thread).",
        "",
        "Surrogate: each task's expert with the task's head (white-box). *relative*: the attack's success on "
        "the merge over its success on the surrogate, averaged over tasks, budgets and (last column) attacks. "
        "*bias*: the mean L1 distance of the merge's features from the expert's on the attacked images. "
        "*clean accuracy*: on the whole test split.",
        "",
        "| merge | clean accuracy (%) | bias | " + " | ".join(cfg.attacks) + " | relative (all) |",
        "|---|---:|---:|" + "---:|" * (len(cfg.attacks) + 1),
    ]
    for label in labels:
        accuracy = cell(label, "accuracy", ".1f")
        lines.append(
            f"| {label} | {accuracy} | {cell(label, 'representation_bias', '.3f')} | "
            + " | ".join(per_attack(label, a) for a in cfg.attacks)
            + f" | {cell(label, 'relative_transfer', '.3f')} |"
        )
    found = insights(seeds, labels)
    lines += ["", "## The paper's insights", ""]
    if "accuracy_vs_transfer" in found:
        r1, r2 = found["accuracy_vs_transfer"], found["bias_vs_transfer"]
        critical = 1.96 / (len(labels) - 1) ** 0.5  # two-sided 5% for Spearman's rho (normal approximation)
        lines.append(
            f"- Stronger merges are more vulnerable: Spearman's rho of clean accuracy and relative transfer "
            f"success over the {len(labels)} merges {r1:+.2f} ({verdict(r1, +1, critical)})."
        )
        lines.append(
            f"- Less representation bias is more vulnerable: rho of bias and relative transfer success "
            f"{r2:+.2f} ({verdict(r2, -1, critical)})."
        )
    averaged = [m.label for m in cfg.methods if m.name == "average"]
    outcome = "holds" if averaged and found["most_vulnerable"] in averaged else "not reproduced"
    lines.append(
        f"- Weight averaging is the most vulnerable: the most vulnerable merge is {found['most_vulnerable']} "
        f"({outcome if averaged else 'no weight averaging in this audit'})."
    )
    return "\n".join(lines) + "\n"


def run_audit(cfg: AuditConfig, command: str, log: Callable[[str], None] = print) -> list[Path]:
    """Audit every seed; write ``audit.md`` and ``audit.json`` under ``cfg.output``."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [audit_seed(cfg, s, log) for s in cfg.seeds]
    md, js = out / "audit.md", out / "audit.json"
    md.write_text(report(cfg, seeds, command))
    payload = {
        "config": asdict(cfg),
        "seeds": seeds,
        "insights": insights(seeds, [m.label for m in cfg.methods]),
    }
    js.write_text(json.dumps(payload, indent=1, default=str))
    return [md, js]
