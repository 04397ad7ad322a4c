"""KNNMonitor: weighted kNN accuracy of the query backbone on clean images during training."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence, Sized
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from mocoq.eval.features import (
    KNNResult,
    embed,
    embed_sharded,
    knn_evaluate_sharded_many,
    shard_loader,
)


def _has_labels(dataset: Any) -> bool:
    """Whether a (possibly wrapped) dataset has labels, read without drawing random numbers."""
    targets = dataset_targets(dataset)
    if targets is not None:
        return bool((targets >= 0).any())
    return int(getattr(dataset, "base", dataset)[0][1]) >= 0


def dataset_targets(dataset: Any) -> Tensor | None:
    """The int64 labels (N,) of a dataset, read from its ``targets`` attribute (or that of the
    ``base`` it wraps, or the second tensor of a ``TensorDataset``) without loading any image;
    None when the dataset does not expose them."""
    base = getattr(dataset, "base", dataset)
    targets = getattr(base, "targets", None)
    if targets is None:
        tensors = getattr(base, "tensors", None)
        targets = tensors[1] if isinstance(tensors, tuple) and len(tensors) == 2 else None
    return None if targets is None else torch.as_tensor(targets).long().flatten()


def _labelled_count(dataset: Any) -> int:
    """Items a whole bank keeps: the labelled ones where the labels can be read, else all."""
    targets = dataset_targets(dataset)
    return len(dataset) if targets is None else int((targets >= 0).sum())


def stratified_subset(length: int, size: int, seed: int, targets: Tensor | None = None) -> Tensor:
    """``size`` distinct indices of ``range(length)``, sorted, drawn from ``seed`` alone.

    With ``targets`` (N,) the draw is stratified: each label value (a negative one included)
    gets ``size * count / N`` items, rounded by largest remainder so the quotas sum to ``size``,
    drawn uniformly within the label. The result depends only on the arguments (a private
    generator, never the global one), so every call and every rank draws the same subset.

    Returns:
        int64 (min(size, N),) indices in increasing order.
    """
    if size < 1:
        raise ValueError(f"a subset needs at least one item, got size={size}")
    if targets is not None and targets.shape != (length,):
        raise ValueError(f"targets {tuple(targets.shape)} do not match the length {length}")
    if size >= length:
        return torch.arange(length)
    generator = torch.Generator().manual_seed(seed)
    if targets is None:
        return torch.randperm(length, generator=generator)[:size].sort().values
    classes, counts = torch.unique(targets, return_counts=True)  # (C,), (C,)
    exact = counts.double() * size / length  # (C,) ideal share of each label
    quotas = exact.floor().long()  # (C,)
    shortfall = size - int(quotas.sum())
    # Largest remainders first; a stable sort breaks ties by label order.
    order = torch.sort(exact - quotas, descending=True, stable=True).indices
    quotas[order[:shortfall]] += 1
    chosen = []
    for label, quota in zip(classes.tolist(), quotas.tolist(), strict=True):
        members = (targets == label).nonzero().flatten()  # (count,)
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:quota]])
    return torch.cat(chosen).sort().values


class _ChannelsLastImages:
    """A collate function that lays the images of ``(images, targets)`` out channels-last in
    the loader's workers, so the encoder gets them in its own layout without a copy."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[Any]) -> Any:
        images, targets = self.collate(items)
        if images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets


class KNNMonitor(pl.Callback):
    """Every ``every_n_epochs`` epochs (and after the last), or ``evaluations`` times spread
    over the run's steps, embeds a clean bank and val set with the query backbone in eval mode
    and logs ``knn/top1`` and ``knn/top5``.

    The bank and queries come from the constructor's loaders or, when those are None, from the
    datamodule's ``knn_bank_dataloader()`` and ``knn_val_dataloader()``. The protocol (k, T) is
    logged beside the accuracy as ``knn/k`` and ``knn/temperature``, the sizes used as
    ``knn/bank_size`` and ``knn/num_queries``.

    Bounded cost: ``bank_size`` and ``max_queries`` evaluate on fixed subsets (see
    :func:`stratified_subset`: class-stratified where the labels can be read, drawn once from
    ``seed``, so every call and every rank uses the same items and the curve moves only with the
    encoder). With ``full_at_end`` the evaluation after the last epoch, and the one at the start
    (the baseline reported beside it), use the whole bank and query set, so the reported numbers
    (``last``, ``initial``) are the full protocol. With ``scale_k`` a bank subset of b of the B
    labelled items is voted on by ``max(1, round(k * b / B))`` neighbours, the same share of the
    bank as the full protocol's k: on the 60,000-image Fashion-MNIST bank a trained encoder then
    scores 1.2 points under the full protocol with a 5,000-image subset (k=17) instead of 7.5
    with k=200 (and 0.8 instead of 5.2 with 10,000 images).

    Cadence: ``evaluations=N`` evaluates after every ``total / N`` optimizer steps and after the
    last step, where ``total`` is the run's number of steps: known from the start in a run
    sized in epochs or steps, and once its rate is measured in a time-budgeted run
    (:class:`~mocoq.callbacks.TimeBudget`), whose end need not fall on an epoch's end. Without
    it, every ``every_n_epochs`` epochs. The run's last step is always evaluated (on the full
    protocol with ``full_at_end``): after the last epoch, or after ``max_steps``.

    ``extra_k``: further neighbour counts scored on the full-protocol evaluations (at the start
    and at the end) from the same features and the same nearest neighbours (one top-k for
    all), kept in ``initial_extra`` and ``last_extra`` and logged as ``knn/top1_k<k>``: the
    report shows the encoder at k=200 and at k=20 at the cost of one evaluation.

    Cost accounting: ``knn/seconds`` is the wall time of one evaluation; ``knn/share`` the
    seconds of the monitoring evaluations (those during training, on the subsets) over the
    training seconds so far (each epoch from its start hook to its end hook, before the
    evaluation); ``knn/share_total`` the same with the full-protocol evaluations (at the start
    and at the end with ``full_at_end``) counted too. ``seconds`` holds the total,
    ``full_seconds`` the full-protocol part of it.

    Under DDP each rank embeds only its 1/W shard of the bank and of the queries (of the subset
    or the whole): the bank is gathered whole on every rank, each rank scores its own queries
    against it and the correct counts are summed, so every rank holds the same result, equal to
    the one-process result. The hooks run on every rank, as the collectives need.

    Images reach the encoder in channels-last layout when the module has ``channels_last`` set
    (converted in the loader's workers) and under the run's precision (bf16 autocast where set).

    Args:
        every_n_epochs: evaluation cadence in epochs (the last epoch is always evaluated).
        k: neighbours.
        temperature: voting temperature T.
        at_start: also evaluate the randomly initialised encoder before the first step, logged
            at step 0 (the baseline the run must beat).
        bank_loader, val_loader: explicit clean loaders of ``(images, targets)``.
        bank_size: labelled bank items per evaluation; None uses the whole bank.
        max_queries: queries per evaluation; None uses all.
        full_at_end: the last (and the at-start) evaluation uses the whole bank and queries.
        seed: seed of the subsets' draw.
        scale_k: on a bank subset, scale k by the subset's share of the labelled bank.
        evaluations: evaluations spread evenly over the run's steps (the last one after its
            last step); None: every ``every_n_epochs`` epochs.
        extra_k: more k to score on the full-protocol evaluations.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        k: int = 200,
        temperature: float = 0.1,
        at_start: bool = False,
        bank_loader: DataLoader[Any] | None = None,
        val_loader: DataLoader[Any] | None = None,
        bank_size: int | None = None,
        max_queries: int | None = None,
        full_at_end: bool = True,
        seed: int = 0,
        scale_k: bool = True,
        evaluations: int | None = None,
        extra_k: Sequence[int] = (),
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be positive, got {every_n_epochs}")
        if k < 1 or temperature <= 0:
            raise ValueError(f"kNN needs k >= 1 and temperature > 0, got k={k}, T={temperature}")
        if evaluations is not None and evaluations < 1:
            raise ValueError(f"evaluations must be positive or null, got {evaluations}")
        if any(int(extra) < 1 for extra in extra_k):
            raise ValueError(f"extra_k must hold positive numbers of neighbours, got {extra_k}")
        for name, size in (("bank_size", bank_size), ("max_queries", max_queries)):
            if size is not None and size < 1:
                raise ValueError(f"{name} must be positive or null (all items), got {size}")
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = temperature
        self.at_start = at_start
        self.bank_loader = bank_loader
        self.val_loader = val_loader
        self.bank_size = bank_size
        self.max_queries = max_queries
        self.full_at_end = full_at_end
        self.seed = seed
        self.scale_k = scale_k
        self.evaluations = evaluations
        self.extra_k = tuple(sorted({int(extra) for extra in extra_k if int(extra) != k}))
        self.disabled = False
        self.initial: KNNResult | None = None
        self.last: KNNResult | None = None
        self.initial_extra: list[KNNResult] = []  # extra_k on the at-start evaluation
        self.last_extra: list[KNNResult] = []  # extra_k on the last full-protocol evaluation
        self._evaluated_step = -1  # the step of the latest step-cadence evaluation
        self.seconds = 0.0  # all evaluations so far
        self.full_seconds = 0.0  # the full-protocol ones among them (at start, at the end)
        self.train_seconds = 0.0  # all training epochs so far, evaluations excluded
        self.last_call_seconds = 0.0
        self._epoch_start: float | None = None
        self._subsets: dict[tuple[str, int], Tensor] = {}

    def _loaders(self, trainer: pl.Trainer) -> tuple[DataLoader[Any], DataLoader[Any]] | None:
        bank, val = self.bank_loader, self.val_loader
        datamodule = getattr(trainer, "datamodule", None)
        if bank is None and datamodule is not None and hasattr(datamodule, "knn_bank_dataloader"):
            bank = datamodule.knn_bank_dataloader()
        if val is None and datamodule is not None and hasattr(datamodule, "knn_val_dataloader"):
            val = datamodule.knn_val_dataloader()
        if bank is None or val is None:
            return None
        return bank, val

    def subset_indices(self, role: str, dataset: Dataset[Any], size: int | None) -> Tensor | None:
        """The fixed subset (sorted int64 indices) of ``role``'s dataset (``bank`` or
        ``queries``), or None for all of it. Drawn on first use and kept: bank items are drawn
        among the labelled ones (the unlabelled are dropped from any bank), queries among all."""
        if size is None or not isinstance(dataset, Sized):
            return None
        length = len(dataset)
        key = (role, length)
        if key not in self._subsets:
            targets = dataset_targets(dataset)
            if targets is not None and targets.shape != (length,):
                targets = None
            candidates = torch.arange(length)  # (N,)
            if role == "bank" and targets is not None:
                candidates = (targets >= 0).nonzero().flatten()  # (N_labelled,)
                targets = targets[candidates]
            if size >= candidates.numel():
                return None if candidates.numel() == length else candidates
            seed = self.seed + (0 if role == "bank" else 1)
            picked = stratified_subset(candidates.numel(), size, seed, targets)
            self._subsets[key] = candidates[picked]
        return self._subsets[key]

    def _prepared(
        self, loader: DataLoader[Any], indices: Tensor | None, channels_last: bool
    ) -> DataLoader[Any]:
        """``loader`` over ``indices`` of its dataset (all if None), images channels-last if
        asked; ``loader`` itself when neither applies."""
        if indices is None and not channels_last:
            return loader
        if loader.batch_size is None:
            raise ValueError("KNNMonitor needs loaders built with batch_size, not a batch_sampler")
        dataset = loader.dataset if indices is None else Subset(loader.dataset, indices.tolist())
        collate = loader.collate_fn
        return DataLoader(
            dataset,
            batch_size=loader.batch_size,
            num_workers=loader.num_workers,
            collate_fn=_ChannelsLastImages(collate) if channels_last else collate,
            pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn,
        )

    def evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, full: bool = False
    ) -> KNNResult | None:
        """Embed bank and queries with ``pl_module``'s forward and score them: the fixed
        subsets, or everything with ``full`` (or when no sizes are set). A full evaluation also
        scores ``extra_k``, kept in ``last_extra``."""
        results = self._evaluate(trainer, pl_module, full)
        if results is None:
            return None
        if full:
            self.last_extra = results[1:]
        return results[0]

    def _evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, full: bool
    ) -> list[KNNResult] | None:
        if self.disabled:
            return None
        loaders = self._loaders(trainer)
        if loaders is None:
            rank_zero_warn("KNNMonitor: no kNN bank or val loader; kNN evaluation is off")
            self.disabled = True
            return None
        if not _has_labels(loaders[0].dataset):
            rank_zero_warn(
                "KNNMonitor: the kNN bank is unlabelled; set dataset.bank_split to a labelled "
                "split to measure kNN accuracy (kNN evaluation is off)"
            )
            self.disabled = True
            return None
        start = time.perf_counter()
        channels_last = bool(getattr(pl_module, "channels_last", False))
        bank_size, max_queries = (None, None) if full else (self.bank_size, self.max_queries)
        bank_indices = self.subset_indices("bank", loaders[0].dataset, bank_size)
        query_indices = self.subset_indices("queries", loaders[1].dataset, max_queries)
        k = self.k
        if bank_indices is not None and self.scale_k:
            k = max(1, round(k * len(bank_indices) / _labelled_count(loaders[0].dataset)))
        bank_loader = self._prepared(loaders[0], bank_indices, channels_last)
        val_loader = self._prepared(loaders[1], query_indices, channels_last)
        # The run's precision (bf16 autocast where configured) makes extraction ~2x cheaper.
        with trainer.precision_plugin.forward_context():
            # Every rank: the whole bank (B, F), (B,); this rank's queries (M_r, F), (M_r,).
            bank, bank_labels = embed_sharded(pl_module, bank_loader, pl_module.device)
            queries, query_labels = embed(pl_module, shard_loader(val_loader), pl_module.device)
        ks = [k, *self.extra_k] if full else [k]
        results = knn_evaluate_sharded_many(
            bank, bank_labels, queries, query_labels, ks, self.temperature
        )
        self.last_call_seconds = time.perf_counter() - start
        self.seconds += self.last_call_seconds
        if full and (self.bank_size is not None or self.max_queries is not None):
            self.full_seconds += self.last_call_seconds
        return results

    def _metrics(self, result: KNNResult, extra: Sequence[KNNResult] = ()) -> dict[str, float]:
        return {
            **{f"knn/top1_k{other.k}": other.top1 for other in extra},
            "knn/top1": result.top1,
            "knn/top5": result.top5,
            "knn/k": float(result.k),
            "knn/temperature": result.temperature,
            "knn/bank_size": float(result.bank_size),
            "knn/num_queries": float(result.num_queries),
            "knn/seconds": self.last_call_seconds,
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_start or trainer.global_step > 0:
            return
        self.initial = self.evaluate(trainer, pl_module, full=self.full_at_end)
        if self.initial is not None:
            self.initial_extra, self.last_extra = self.last_extra, []
            rank_zero_info(f"kNN at initialisation: {self.initial.describe()}")
            for logger in trainer.loggers:
                logger.log_metrics(self._metrics(self.initial, self.initial_extra), step=0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    @staticmethod
    def total_steps(trainer: pl.Trainer) -> int | None:
        """The run's optimizer steps, or None while unknown (a budget still measuring)."""
        total = trainer.estimated_stepping_batches
        return None if math.isinf(total) else int(total)

    @staticmethod
    def is_last(trainer: pl.Trainer) -> bool:
        """Whether the training loop has reached its end: ``max_steps``, or the last epoch."""
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return True
        epochs = trainer.max_epochs
        return epochs is not None and epochs >= 0 and trainer.current_epoch + 1 >= epochs

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """With ``evaluations``: evaluate on the subsets every ``total / evaluations`` steps
        (the evaluation after the last step comes at the epoch's end)."""
        if self.evaluations is None or self.disabled:
            return
        step, total = trainer.global_step, self.total_steps(trainer)
        if total is None or step >= total or step == self._evaluated_step:
            return
        # Evaluation i (1..N-1) after step round(i * total / N); several steps per optimizer
        # step (gradient accumulation) evaluate once.
        due = {round(i * total / self.evaluations) for i in range(1, self.evaluations)}
        if step not in due:
            return
        self._evaluated_step = step
        if self._epoch_start is not None:  # the evaluation is not training time
            self.train_seconds += time.perf_counter() - self._epoch_start
        result = self.evaluate(trainer, pl_module)
        if self._epoch_start is not None:
            self._epoch_start = time.perf_counter()
        if result is None:
            return
        self.last = result
        rank_zero_info(
            f"kNN after step {step} of {total}: {result.describe()}, {self.last_call_seconds:.1f} s"
        )
        metrics = {**self._metrics(result), "knn/share": self.share}
        metrics["knn/share_total"] = self.share_total
        for logger in trainer.loggers:  # every rank holds the same numbers
            logger.log_metrics(metrics, step=step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_start is not None:
            self.train_seconds += time.perf_counter() - self._epoch_start
            self._epoch_start = None
        epoch = trainer.current_epoch + 1
        last = self.is_last(trainer)
        if not last and (self.evaluations is not None or epoch % self.every_n_epochs):
            return
        result = self.evaluate(trainer, pl_module, full=last and self.full_at_end)
        if result is None:
            return
        self.last = result
        where = f"step {trainer.global_step}" if self.evaluations is not None else f"epoch {epoch}"
        rank_zero_info(f"kNN after {where}: {result.describe()}, {self.last_call_seconds:.1f} s")
        extra = self.last_extra if last and self.full_at_end else []
        metrics = self._metrics(result, extra)
        metrics["knn/share"] = self.share
        metrics["knn/share_total"] = self.share_total
        # Every rank holds the same accuracies: syncing them with max keeps them exact (a mean
        # could round) and is what Lightning asks of epoch-level metrics under DDP; for the
        # seconds it reports the slowest rank.
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")

    @property
    def share(self) -> float:
        """Seconds of the monitoring evaluations (all but the full-protocol ones) per training
        second so far (0 before any training)."""
        monitoring = self.seconds - self.full_seconds
        return monitoring / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def share_total(self) -> float:
        """All evaluation seconds, the full-protocol ones included, per training second."""
        return self.seconds / self.train_seconds if self.train_seconds > 0 else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "full_seconds": self.full_seconds,
            "train_seconds": self.train_seconds,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds = float(state_dict.get("seconds", 0.0))
        self.full_seconds = float(state_dict.get("full_seconds", 0.0))
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))
