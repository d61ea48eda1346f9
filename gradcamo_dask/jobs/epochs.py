"""One epoch of training and the evaluation of a split: batches, autocast, seeding.

:class:`Batches` streams shuffled, augmented, standardised batches of one split
from a :class:`~gradcamo_dask.jobs.trainset.SiteReader`; :func:`train_epoch` runs
one epoch of the optimiser on them; :func:`evaluate_split` measures loss, accuracy
and, at a layer, Grad-CAMO. Every random draw comes from a generator seeded with
``(seed, epoch)`` (:func:`seed_of`), so runs are reproducible and resumable.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from gradcamo_dask.engine.augment import Augmentation, augment_with_masks
from gradcamo_dask.engine.precision import autocast_context
from gradcamo_dask.engine.regularize import gradcamo_loss
from gradcamo_dask.jobs.trainset import SiteReader

__all__ = ["Batches", "evaluate_split", "seed_of", "to_device", "train_epoch"]


def seed_of(seed: int, epoch: int) -> int:
    """A 63-bit seed drawn from ``(seed, epoch)`` (independent streams per epoch)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)[0] % (2**63))


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch ``(cell, c, z, y, x)`` (or 2D ``(cell, c, y, x)``) on ``device``, channels-last when asked."""
    x = x.to(device, non_blocking=True)
    if not channels_last:
        return x
    return x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)


class Batches:
    """Shuffled batches of one split: sites in a seeded order, read ``shuffle_sites`` at a
    time, cells shuffled within each group; the random draws do not depend on the cache."""

    def __init__(self, reader: SiteReader, split: str, labels: np.ndarray, normalization: dict,
                 batch_size: int, shuffle_sites: int) -> None:
        self.reader, self.split, self.labels = reader, split, labels
        self.batch_size, self.shuffle_sites = batch_size, shuffle_sites
        per_channel = (1, -1) + (1,) * len(reader.input_shape)  # 2D plates: (cell, c, y, x) batches
        self.mean = torch.tensor(normalization["mean"], dtype=torch.float32).view(per_channel)
        self.std = torch.tensor(normalization["std"], dtype=torch.float32).view(per_channel)
        self.keys = reader.sites([split])
        split_of = reader.table["split"].to_numpy()
        self.n_cells = int((split_of == split).sum())

    def __len__(self) -> int:
        return math.ceil(self.n_cells / self.batch_size)

    def iterate(self, generator: torch.Generator | None, augmentation: Augmentation | None):
        """Yield ``(inputs, labels, masks)``; ``generator=None``: fixed order, no augmentation."""
        order = (torch.randperm(len(self.keys), generator=generator).tolist() if generator is not None
                 else list(range(len(self.keys))))
        keys = [self.keys[i] for i in order]
        split_of = self.reader.table["split"].to_numpy()
        carry: list[tuple[torch.Tensor, torch.Tensor, np.ndarray]] = []
        for start in range(0, len(keys), self.shuffle_sites):
            group = list(self.reader.stream(keys[start:start + self.shuffle_sites]))
            xs, ms, rows = [], [], []
            for _key, data in group:
                keep = np.flatnonzero(split_of[data.rows] == self.split)
                xs.append(data.inputs[keep])
                ms.append(data.masks[keep])
                rows.append(data.rows[keep])
            x, m, r = torch.cat(xs), torch.cat(ms), np.concatenate(rows)
            if carry:
                x, m, r = torch.cat([carry[0][0], x]), torch.cat([carry[0][1], m]), np.concatenate([carry[0][2], r])
                carry = []
            perm = torch.randperm(len(r), generator=generator) if generator is not None else torch.arange(len(r))
            x, m, r = x[perm], m[perm], r[perm.numpy()]
            last = start + self.shuffle_sites >= len(keys)
            n_full = len(r) if last else (len(r) // self.batch_size) * self.batch_size
            starts = list(range(0, n_full, self.batch_size))
            if last and len(starts) > 1 and n_full - starts[-1] == 1:
                starts.pop()  # a last batch of one cell breaks batch norm in training: merge it
            for b, e in zip(starts, starts[1:] + [n_full]):
                xb, mb = x[b:e], m[b:e]
                if generator is not None and augmentation is not None:
                    xb, mb = augment_with_masks(xb, mb, generator, augmentation)  # a flipped crop, a flipped mask
                yield (xb - self.mean) / self.std, torch.from_numpy(self.labels[r[b:e]]), mb
            if not last and n_full < len(r):
                carry = [(x[n_full:], m[n_full:], r[n_full:])]


def evaluate_split(model: nn.Module, batches: Batches, *, device: torch.device, channels_last: bool,
                   autocast: Any = None, layer: str | None = None) -> dict[str, Any]:
    """Loss and accuracy of a split (eval mode, no augmentation); with ``layer`` also
    Grad-CAMO of the predicted class per cell (low-resolution route, as :func:`explain`).

    Returns a dict with ``loss``, ``accuracy``, ``n`` and, with a layer, ``gradcamo``
    (per-cell array, NaN where undefined), ``gradcamo_mean``, ``gradcamo_sd``,
    ``n_undefined``, ``predicted``, ``rows``.
    """
    from gradcamo_dask.engine.explain import map_maker
    from gradcamo_dask.engine.gradcamo import gradcamo_lowres

    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    scores, predicted = [], []
    try:
        for x, y, m in batches.iterate(None, None):
            x = to_device(x, device, channels_last)
            y = y.to(device)
            if layer is None:
                with torch.no_grad(), autocast_context(device, autocast):
                    logits = model(x).float()
            else:
                with map_maker(model, [layer], True, "auto") as cam, autocast_context(device, autocast):
                    result = cam(x, target="predicted")
                logits = result.logits.float()
                score, _, _ = gradcamo_lowres(result.cams[layer], m.to(device))
                scores.append(score.cpu().numpy())
            total_loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            pred = logits.argmax(dim=1)
            predicted.append(pred.cpu().numpy())
            correct += int((pred == y).sum())
            n += len(y)
    finally:
        model.train(was_training)
    out: dict[str, Any] = {"loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1), "n": n}
    if layer is not None:
        s = np.concatenate(scores) if scores else np.zeros(0)
        defined = s[np.isfinite(s)]
        out.update(gradcamo=s, gradcamo_mean=float(defined.mean()) if len(defined) else float("nan"),
                   gradcamo_sd=float(defined.std()) if len(defined) else float("nan"),
                   n_undefined=int((~np.isfinite(s)).sum()), predicted=np.concatenate(predicted))
    return out


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Batches, *, epoch: int,
                 epochs: int, seed: int, augmentation: Augmentation | None, regularizer: float, layer: str,
                 target: str, device: torch.device, channels_last: bool, autocast: Any, progress: bool,
                 epoch_batchnorm: bool = False, evidence: str = "positive", cam: str = "gradcam") -> dict:
    from tqdm.auto import tqdm

    torch.manual_seed(seed_of(seed, epoch))  # dropout and drop-connect
    generator = torch.Generator().manual_seed(seed_of(seed, 10_000 + epoch))
    model.train()
    if epoch_batchnorm:  # running statistics = the average over this epoch's batches
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None
    total, correct, n, score_sum, score_n, undefined = 0.0, 0, 0, 0.0, 0, 0
    bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
    try:
        for x, y, m in batches.iterate(generator, augmentation):
            x = to_device(x, device, channels_last)
            y = y.to(device)
            with autocast_context(device, autocast):
                result = gradcamo_loss(model, x, y, m, layer=layer, lam=regularizer, target=target, evidence=evidence,
                                       method=cam)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            optimizer.step()
            k = len(y)
            total += float(result.cross_entropy.detach()) * k
            correct += int((result.logits.detach().argmax(dim=1) == y).sum())
            n += k
            if regularizer:
                s = result.scores[torch.isfinite(result.scores)]
                score_sum, score_n, undefined = score_sum + float(s.sum()), score_n + len(s), \
                    undefined + result.n_undefined
            post = {"loss": f"{total / n:.3f}", "acc": f"{correct / n:.3f}"}
            if score_n:
                post["gradcamo"] = f"{score_sum / score_n:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
    finally:
        bar.close()
    record = {"epoch": epoch + 1, "train_loss": total / max(n, 1), "train_accuracy": correct / max(n, 1)}
    if regularizer:
        record.update(train_gradcamo=score_sum / score_n if score_n else None, train_undefined=undefined)
    return record
