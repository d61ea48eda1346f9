"""Surviving the walltime: workers retire before their job is killed, and lost jobs are replaced.

A SLURM job ends at its walltime whatever runs in it. Its workers are therefore
given a *lifetime* a margin shorter than the walltime (staggered so that jobs do not
all leave at once): a worker that reaches it stops taking tasks, hands its results
over and exits, its job ends, and :class:`ReplacingAdaptive` submits a new job. The
lifetime travels as Dask configuration in the job's environment
(``DASK_DISTRIBUTED__WORKER__LIFETIME__DURATION``, ...), which every
``distributed.Worker`` reads whatever command started it, so dask-cuda workers honour
it without depending on dask-cuda's command-line options.

Why a subclass of :class:`distributed.deploy.Adaptive`: Dask's adaptive scaling counts
a worker spec whose job is gone as still planned, so the target equals the plan and no
new job is asked for. Seen here: ``adapt(minimum=2, maximum=2)`` on a LocalCluster
whose workers' lifetimes ended, with no task pending, stayed at zero workers; with
this class the ended workers were replaced (dask-jobqueue uses the same ``SpecCluster``).
"""

from __future__ import annotations

import re
from typing import Any

from dask.utils import parse_timedelta
from distributed.deploy.adaptive import Adaptive

from gradcamo_dask.errors import ClusterError

__all__ = ["ReplacingAdaptive", "lifetime_environment", "slurm_walltime_seconds", "worker_lifetime_seconds"]

_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_walltime_seconds(walltime: str | int) -> int:
    """Seconds of a SLURM ``--time`` value: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM(:SS)``.

    Parsed by hand: SLURM's own format, which no Python library reads
    (``dask.utils.parse_timedelta`` takes ``"4h"``, not ``"04:00:00"``).
    """
    found = _WALLTIME.match(str(walltime).strip())
    if not found:
        raise ClusterError(f"jobqueue.slurm.walltime {walltime!r} is not a SLURM time (e.g. \"04:00:00\", "
                           "\"1-00:00:00\", \"90\" minutes)")
    days, first, second, third = found.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        h, m, s = int(first), int(second or 0), int(third or 0)
        return int(days) * 86400 + h * 3600 + m * 60 + s
    if third is not None:  # HH:MM:SS
        return int(first) * 3600 + int(second) * 60 + int(third)
    return int(first) * 60 + int(second or 0)  # MM or MM:SS


def worker_lifetime_seconds(walltime: str | int, margin: str | float, stagger: str | float) -> int:
    """Worker lifetime for a job of ``walltime``: ``walltime - margin - stagger`` seconds (> 0).

    The stagger is subtracted too because Dask spreads lifetimes by up to ``stagger``
    either way, and no worker may outlive its job.
    """
    total = slurm_walltime_seconds(walltime)
    margin_s = parse_timedelta(margin, default="s")
    stagger_s = parse_timedelta(stagger, default="s")
    lifetime = int(total - margin_s - stagger_s)
    if lifetime <= 0:
        raise ClusterError(f"jobqueue.slurm.walltime {walltime} ({total} s) leaves no worker lifetime after "
                           f"gradcamo.slurm.lifetime-margin ({margin_s:g} s) and lifetime-stagger ({stagger_s:g} s); "
                           "ask for a longer walltime or lower the margin")
    return lifetime


def lifetime_environment(lifetime_s: int, stagger: str | float) -> list[str]:
    """Job-script lines that give every Dask worker of the job this lifetime and stagger (no restart)."""
    stagger_s = int(parse_timedelta(stagger, default="s"))
    return [f"export DASK_DISTRIBUTED__WORKER__LIFETIME__DURATION={int(lifetime_s)}s",
            f"export DASK_DISTRIBUTED__WORKER__LIFETIME__STAGGER={stagger_s}s",
            "export DASK_DISTRIBUTED__WORKER__LIFETIME__RESTART=False"]


class ReplacingAdaptive(Adaptive):
    """:class:`distributed.deploy.Adaptive` that also replaces workers whose job has ended.

    A worker spec still planned but no longer running (its job reached the walltime,
    was preempted or failed) makes the next adaptive step scale up to the target,
    which starts a new job for it. Otherwise Dask's own recommendations apply.
    """

    async def recommendations(self, target: int) -> dict[str, Any]:
        lost = set(self.cluster.worker_spec) - set(self.cluster.workers)
        if lost:
            return {"status": "up", "n": max(int(target), len(self.plan))}
        return await super().recommendations(target)
