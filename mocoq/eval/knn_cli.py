"""``mocoq-knn``: offline weighted kNN accuracy of a trained encoder over a grid of k and T.

Usage::

    mocoq-knn checkpoint=outputs/2026-01-05/10-00-00           # the run's checkpoints/last.ckpt
    mocoq-knn checkpoint=run k=[20,200] temperature=[0.07,0.1] features=[backbone]
    mocoq-knn checkpoint=run +dataset.root=/data/fashion-mnist  # the run's dataset, moved
    mocoq-knn checkpoint=backbone.pt dataset=cifar10 dataset.root=~/data/cifar10

The bank is the un-augmented labelled training split of the dataset (``dataset.bank_split``),
the queries its ``dataset.val_split``, as in :class:`~mocoq.callbacks.KNNMonitor`; the vote is
the monitor's (cosine similarity, ``exp(sim / T)`` weights). Each feature kind (``backbone``
features, or the projection ``head``'s output) is embedded once; the k most similar bank items
of every query are found once, for the largest k, and every (k, T) of the grid is scored from
them. Prints a table of top-1 accuracies and writes every top-1 / top-5 to
``<output_dir>/knn.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from torch import Tensor

from mocoq.eval.checkpoint import (
    ENCODERS,
    FEATURE_KINDS,
    autocast,
    evaluation_datamodule,
    load_encoder,
    one_line_errors,
    require_checkpoint,
    resolve_device,
    write_json,
)
from mocoq.eval.features import KNNResult, _labelled_bank, _result, embed
from mocoq.train import CONFIG_DIR, ConfigError


@torch.no_grad()
def knn_grid(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    ks: Sequence[int],
    temperatures: Sequence[float],
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> list[KNNResult]:
    """Weighted kNN top-1 / top-5 for every (k, T) of a grid, from one similarity pass.

    For each chunk of queries the ``max(ks)`` most cosine-similar bank items are found once;
    the vote with k neighbours and temperature T then uses the first k of them, weighted by
    ``exp(sim / T)``: the result of :func:`mocoq.eval.features.knn_evaluate` for each (k, T)
    (up to the order of exactly equal similarities at the k-th place).

    Args:
        bank: (B, D) reference features; items with label < 0 are dropped.
        bank_labels: (B,) labels.
        queries: (M, D) features to classify.
        query_labels: (M,) true labels.
        ks: neighbour counts (each clamped to the labelled bank size, as the monitor does).
        temperatures: voting temperatures, > 0.
        num_classes: C; None: one more than the largest bank or query label.
        chunk_size: queries per similarity block (memory: chunk_size x B floats).

    Returns:
        One :class:`KNNResult` per (k, T), k-major, in the order given.
    """
    if not ks or min(ks) < 1:
        raise ConfigError(f"k must be a non-empty list of positive integers, got {list(ks)}")
    if not temperatures or min(temperatures) <= 0:
        raise ConfigError(
            f"temperature must be a non-empty list of positive values, got {list(temperatures)}"
        )
    if queries.shape[0] == 0:
        raise ConfigError("the query split is empty: choose another dataset.val_split")
    bank, bank_labels = _labelled_bank(bank, bank_labels)
    classes = num_classes or int(max(bank_labels.max().item(), query_labels.max().item())) + 1
    size = bank.shape[0]
    used_ks = [min(k, size) for k in ks]
    largest = max(used_ks)
    bank = F.normalize(bank.float(), dim=1)  # (B, D)
    labels = bank_labels.to(bank.device).long()  # (B,)
    correct = torch.zeros(len(ks), len(temperatures), 2, dtype=torch.long, device=bank.device)
    normalized = F.normalize(queries.float(), dim=1)  # (M, D)
    for chunk, truth in zip(
        torch.split(normalized, chunk_size), torch.split(query_labels, chunk_size), strict=True
    ):
        similarity = chunk.to(bank.device) @ bank.t()  # (m, B)
        top_sim, top_idx = similarity.topk(largest, dim=1)  # (m, kmax), descending
        top_labels = labels[top_idx]  # (m, kmax)
        truth = truth.to(bank.device).unsqueeze(1)  # (m, 1)
        for i, k in enumerate(used_ks):
            for j, temperature in enumerate(temperatures):
                weights = (top_sim[:, :k] / temperature).exp()  # (m, k)
                votes = torch.zeros(chunk.shape[0], classes, device=bank.device)  # (m, C)
                votes.scatter_add_(1, top_labels[:, :k], weights)
                ranked = votes.topk(min(5, classes), dim=1).indices  # (m, min(5, C))
                hits = ranked == truth
                correct[i, j, 0] += hits[:, :1].any(dim=1).sum()
                correct[i, j, 1] += hits.any(dim=1).sum()
    return [
        _result(correct[i, j], queries.shape[0], k, temperature, size)
        for i, k in enumerate(used_ks)
        for j, temperature in enumerate(temperatures)
    ]


def _numbers(value: Any, name: str, kind: type) -> list[Any]:
    values = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    try:
        return [kind(v) for v in values]
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{name} must be a list of numbers, got {values}") from error


def run_knn(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate with a composed ``conf/knn.yaml``: prints the table, writes ``knn.json``,
    returns the report written there."""
    source = require_checkpoint(cfg, "mocoq-knn")
    ks = sorted(set(_numbers(cfg.k, "k", int)))
    temperatures = sorted(set(_numbers(cfg.temperature, "temperature", float)))
    if cfg.encoder not in ENCODERS:
        raise ConfigError(f"encoder must be one of {ENCODERS}, got {cfg.encoder!r}")
    encoder = load_encoder(source, cfg.get("config"), key_encoder=cfg.encoder == "key")
    kinds = list(cfg.features) if cfg.get("features") else None
    if kinds is None:  # the projection head too, where the source has one
        kinds = ["backbone", "head"] if encoder.head is not None else ["backbone"]
    for kind in kinds:
        if kind not in FEATURE_KINDS:
            raise ConfigError(f"features must be among {list(FEATURE_KINDS)}, got {kind!r}")
    baseline = cfg.get("baseline")
    if baseline:  # the same protocol on a reference instead of the trained encoder
        extractors = {"backbone": encoder.baseline(str(baseline), int(cfg.get("seed", 0)))}
    else:
        extractors = {kind: encoder.extractor(kind, cfg.encoder) for kind in kinds}  # checks first
    datamodule = evaluation_datamodule(encoder, cfg.get("dataset"))
    splits = {"bank": datamodule.bank_split, "queries": datamodule.val_split}
    for role, option in (("bank", "bank_split"), ("queries", "val_split")):
        if splits[role] is None:
            raise ConfigError(
                f"dataset.{option} is null, so there is no kNN {role}: set "
                f"+dataset.{option}=<a labelled split>"
            )
    bank_loader = datamodule.clean_dataloader(str(splits["bank"]))
    query_loader = datamodule.clean_dataloader(str(splits["queries"]))
    device = resolve_device(str(cfg.device))
    encoder.to(device)
    for extractor in extractors.values():
        extractor.to(device)

    results: list[dict[str, Any]] = []
    seconds = {"embed": 0.0, "knn": 0.0}
    for kind, extractor in extractors.items():
        start = time.perf_counter()
        with autocast(device, str(cfg.precision)):
            bank, bank_labels = embed(extractor, bank_loader, device)  # (B, F), (B,)
            queries, query_labels = embed(extractor, query_loader, device)  # (M, F), (M,)
        middle = time.perf_counter()
        grid = knn_grid(bank, bank_labels, queries, query_labels, ks, temperatures)
        seconds["embed"] += middle - start
        seconds["knn"] += time.perf_counter() - middle
        results += [{"features": kind, **asdict(result)} for result in grid]

    best = max(results, key=lambda r: (r["top1"], r["top5"]))
    report: dict[str, Any] = {
        "source": str(encoder.source),
        "kind": encoder.kind,
        "baseline": str(baseline) if baseline else None,
        "encoder": cfg.encoder if encoder.kind == "checkpoint" else encoder.encoder,
        "step": encoder.step,
        "epoch": encoder.epoch,
        "dataset": {
            "bank_split": splits["bank"],
            "query_split": splits["queries"],
            "bank_size": results[0]["bank_size"],
            "num_queries": results[0]["num_queries"],
        },
        "metric": "cosine similarity, exp(sim / T)-weighted vote",
        "k": sorted({r["k"] for r in results}),
        "temperature": temperatures,
        "precision": str(cfg.precision),
        "results": results,
        "best": best,
        "seconds": {key: round(value, 2) for key, value in seconds.items()},
    }
    output = Path(str(cfg.output_dir)) / "knn.json"
    write_json(output, report)
    print(format_table(report))
    print(f"Results : {output}")
    return report


def format_table(report: dict[str, Any]) -> str:
    """The top-1 accuracies as rows (features, k) by columns (T), and the best entry."""
    data = report["dataset"]
    temperatures = report["temperature"]
    lines = [
        "",
        f"kNN of the {report['encoder']} encoder of {report['source']} (step {report['step']})",
        f"bank '{data['bank_split']}' ({data['bank_size']} images), queries "
        f"'{data['query_split']}' ({data['num_queries']}); {report['metric']}",
        "top-1".ljust(14) + "".join(f"T={t:<8g}" for t in temperatures),
    ]
    table = {(r["features"], r["k"], r["temperature"]): r for r in report["results"]}
    for kind in dict.fromkeys(r["features"] for r in report["results"]):
        lines.append(kind)
        for k in report["k"]:
            row = [table.get((kind, k, t)) for t in temperatures]
            cells = "".join(f"{r['top1']:<10.4f}" if r else " " * 10 for r in row)
            lines.append(f"  k={k:<10d}{cells}")
    best = report["best"]
    lines.append(
        f"Best    : {best['features']} features, k={best['k']}, T={best['temperature']:g}: "
        f"top-1 {best['top1']:.4f}, top-5 {best['top5']:.4f}"
    )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="knn")
def _main(cfg: DictConfig) -> None:
    with one_line_errors("mocoq-knn"):
        run_knn(cfg)


def main() -> None:
    """Entry point of ``mocoq-knn``."""
    _main()


if __name__ == "__main__":
    main()
