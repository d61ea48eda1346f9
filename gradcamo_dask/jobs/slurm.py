"""Start GPU Dask workers on a SLURM cluster through dask-jobqueue.

The configuration is one YAML file (``deploy/slurm/jobqueue.yaml`` is the shipped
example) with two sections:

``gradcamo.slurm``
    what this package needs to know: ``gpus-per-job`` (GPUs each SLURM job asks for
    with ``--gres=gpu:N``; one dask-cuda worker runs per GPU); ``minimum-jobs`` and
    ``maximum-jobs`` (the cluster adapts between them, default 1 and 1; ``--workers``
    raises the maximum); ``lifetime-margin`` and ``lifetime-stagger`` (workers leave
    this long before the walltime, default 10m and 5m); ``tls`` (default true:
    temporary TLS certificates, see below).
``jobqueue.slurm``
    ordinary dask-jobqueue settings (``cores``, ``memory``, ``queue``, ``account``,
    ``walltime``, ``job-script-prologue``, ...; the keys dask-jobqueue documents),
    so the same section also works as ``~/.config/dask/jobqueue.yaml``.

:func:`slurm_cluster` adds the GPU parts itself: the ``--gres`` directive, one
worker process per GPU, the dask-cuda worker command and the ``GPU=1`` worker
resource, a worker lifetime below the walltime, an adaptive scaler that replaces
ended jobs (:mod:`gradcamo_dask.jobs.walltime`) and TLS. The scheduler of a SLURM
cluster listens on a login node's network, where any user can reach it, so without
``--tls-*`` files it gets dask-jobqueue's temporary certificates (``security=True``:
a fresh CA per run, key files mode 0600 in ``shared-temp-directory``, default
``~/.gradcamo-dask/tls``, deleted when the cluster goes); ``gradcamo.slurm.tls: false`` turns that off.
dask-jobqueue runs ``python -m <worker-command>``; the dask-cuda worker's
module form is ``dask_cuda.cli`` (its ``__main__`` block runs the ``worker``
command; ``dask-cuda-worker`` is only a console-script name and fails after
``-m``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from gradcamo_dask.errors import ClusterError
from gradcamo_dask.jobs.walltime import ReplacingAdaptive, lifetime_environment, worker_lifetime_seconds

#: Module that ``python -m`` turns into a dask-cuda worker (see the module docstring).
DASK_CUDA_WORKER_MODULE = "dask_cuda.cli"

#: The config key holding the GPU count per job, as written in the YAML file.
GPU_COUNT_KEY = "gradcamo.slurm.gpus-per-job"

# jobqueue.slurm keys this module sets itself from gpus-per-job; a value in the file
# would silently fight ours, so it is an error that names the key.
_MANAGED_KEYS = {
    "processes": "one worker process per GPU is derived from gradcamo.slurm.gpus-per-job",
    "worker-command": f"the dask-cuda worker module ({DASK_CUDA_WORKER_MODULE}) is set by gradcamo-dask",
}
_REQUIRED_KEYS = ("cores", "memory")
#: gradcamo.slurm settings besides gpus-per-job, with their defaults.
GRADCAMO_DEFAULTS = {"minimum-jobs": 1, "maximum-jobs": 1, "lifetime-margin": "10m", "lifetime-stagger": "5m",
                     "tls": True}
_BARE_VARIABLE = re.compile(r"^\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?$")


def quoted_local_directory(value: str) -> str:
    """``local-directory`` for the job script, quoted so an empty or spaced value cannot eat the next flag.

    dask-jobqueue pastes the value into the worker command unquoted: ``$TMPDIR`` with
    ``TMPDIR`` unset made ``--local-directory --resources GPU=1``. A bare variable
    gets ``/tmp`` as fallback (``"${TMPDIR:-/tmp}"``); anything else is double-quoted
    (variables still expand on the node).
    """
    text = str(value).strip()
    if text.startswith('"') and text.endswith('"') and len(text) > 1:
        return text
    bare = _BARE_VARIABLE.match(text)
    if bare:
        return f'"${{{bare.group(1)}:-/tmp}}"'
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def open_slurm_config(config_path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a gradcamo-dask SLURM configuration file.

    Parameters
    ----------
    config_path
        YAML file with ``gradcamo.slurm.gpus-per-job`` and a ``jobqueue.slurm``
        section (see ``deploy/slurm/jobqueue.yaml``).

    Returns
    -------
    dict
        Keyword arguments for :class:`dask_jobqueue.SLURMCluster` (underscored
        names), with the GPU directive, worker count per job, dask-cuda worker
        command and ``GPU=1`` resource filled in.

    Raises
    ------
    ClusterError
        The file is missing or not YAML, or a key is missing or wrong; the message
        names the file and the key (e.g. ``gradcamo.slurm.gpus-per-job``).
    """
    import yaml

    path = Path(config_path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ClusterError(f"cannot read the SLURM configuration {path}: {err}; pass the path of a YAML "
                           "file like deploy/slurm/jobqueue.yaml with --cluster-config") from err
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ClusterError(f"the SLURM configuration {path} is not valid YAML: {err}") from err
    if not isinstance(document, dict):
        raise ClusterError(f"the SLURM configuration {path} must be a YAML mapping with 'gradcamo' and "
                           "'jobqueue' sections (see deploy/slurm/jobqueue.yaml)")

    gpus = _lookup(document, GPU_COUNT_KEY)
    if gpus is None:
        raise ClusterError(f"the SLURM configuration {path} has no GPU count: set {GPU_COUNT_KEY} "
                           "(GPUs per SLURM job, e.g. 1 or 4; one dask-cuda worker runs per GPU)")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ClusterError(f"{GPU_COUNT_KEY} in {path} must be a whole number >= 1, got {gpus!r}")

    slurm = _lookup(document, "jobqueue.slurm")
    if not isinstance(slurm, dict):
        raise ClusterError(f"the SLURM configuration {path} has no 'jobqueue.slurm' section (dask-jobqueue "
                           "settings: cores, memory, queue, walltime, ...)")
    _check_jobqueue_section(slurm, path)
    directives = list(slurm.get("job-extra-directives") or [])

    kwargs = {key.replace("-", "_"): value for key, value in slurm.items()}
    if kwargs.get("local_directory"):
        kwargs["local_directory"] = quoted_local_directory(kwargs["local_directory"])
    options = gradcamo_options(document, path)
    walltime = slurm.get("walltime") or _jobqueue_default("walltime")
    if walltime:
        lifetime = worker_lifetime_seconds(walltime, options["lifetime-margin"], options["lifetime-stagger"])
        kwargs["job_script_prologue"] = [*(slurm.get("job-script-prologue") or []),
                                         *lifetime_environment(lifetime, options["lifetime-stagger"])]
    kwargs["processes"] = gpus
    kwargs["worker_command"] = DASK_CUDA_WORKER_MODULE
    kwargs["job_extra_directives"] = [*directives, f"--gres=gpu:{gpus}"]
    extra_args = list(slurm.get("worker-extra-args") or [])
    if "--resources" not in extra_args:
        extra_args += ["--resources", "GPU=1"]
    kwargs["worker_extra_args"] = extra_args
    return kwargs


def _check_jobqueue_section(slurm: dict, path: Path) -> None:
    """Refuse missing, unknown, managed or wrongly typed ``jobqueue.slurm`` keys, naming the key and the file."""
    for key in _REQUIRED_KEYS:
        if slurm.get(key) in (None, ""):
            raise ClusterError(f"jobqueue.slurm.{key} is missing in {path} (per SLURM job, e.g. cores: 8, "
                               "memory: 64GiB)")
    known = _known_jobqueue_keys()
    unknown = sorted(set(slurm) - known) if known else []
    if unknown:
        raise ClusterError(f"dask-jobqueue has no setting jobqueue.slurm.{unknown[0]} (in {path}); known "
                           f"settings: {', '.join(sorted(known))}")
    for key, why in _MANAGED_KEYS.items():
        if key in slurm:
            raise ClusterError(f"remove jobqueue.slurm.{key} from {path}: {why}")
    for key in ("job-extra-directives", "worker-extra-args", "job-script-prologue"):
        if slurm.get(key) is not None and not isinstance(slurm[key], list):
            raise ClusterError(f"jobqueue.slurm.{key} in {path} must be a list of strings")
    directives = list(slurm.get("job-extra-directives") or [])
    if any("--gres" in str(d) for d in directives):
        raise ClusterError(f"remove the --gres directive from jobqueue.slurm.job-extra-directives in {path}: "
                           f"it is made from {GPU_COUNT_KEY}")


def gradcamo_options(document: dict, path: Any = "") -> dict[str, Any]:
    """The ``gradcamo.slurm`` settings other than gpus-per-job, defaults filled in and checked."""
    section = _lookup(document, "gradcamo.slurm") or {}
    unknown = sorted(set(section) - set(GRADCAMO_DEFAULTS) - {"gpus-per-job"})
    if unknown:
        raise ClusterError(f"gradcamo.slurm has no setting {unknown[0]} (in {path}); known settings: gpus-per-job, "
                           f"{', '.join(GRADCAMO_DEFAULTS)}")
    options = {**GRADCAMO_DEFAULTS, **section}
    low, high = options["minimum-jobs"], options["maximum-jobs"]
    for key, value in (("minimum-jobs", low), ("maximum-jobs", high)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ClusterError(f"gradcamo.slurm.{key} in {path} must be a whole number >= 0, got {value!r}")
    if high < max(1, low):
        raise ClusterError(f"gradcamo.slurm.maximum-jobs ({high}) in {path} must be >= 1 and >= minimum-jobs ({low})")
    if not isinstance(options["tls"], bool):
        raise ClusterError(f"gradcamo.slurm.tls in {path} must be true or false, got {options['tls']!r}")
    return options


def slurm_cluster(config_path: str | os.PathLike, n_workers: int | None = None, *,
                  security: Any = None) -> Any:
    """Start a :class:`dask_jobqueue.SLURMCluster` of dask-cuda GPU workers.

    Parameters
    ----------
    config_path
        The YAML configuration (see :func:`open_slurm_config`).
    n_workers
        Most GPU workers to adapt up to (jobs = ``ceil(n_workers / gpus-per-job)``);
        ``None`` or 0: ``gradcamo.slurm.maximum-jobs``.
    security
        A full-role :class:`distributed.security.Security` (scheduler, worker and
        client certificates) for TLS; the workers get the certificate paths on their
        command line, so the files must sit on a filesystem the compute nodes share.
        None: temporary certificates (``security=True``) unless ``gradcamo.slurm.tls``
        is false.

    Returns
    -------
    dask_jobqueue.SLURMCluster
        The scheduler runs in this process, adapting between ``minimum-jobs`` and the
        maximum with :class:`~gradcamo_dask.jobs.walltime.ReplacingAdaptive`; close the
        cluster to cancel the jobs.
    """
    import yaml

    kwargs = open_slurm_config(config_path)
    options = gradcamo_options(yaml.safe_load(Path(config_path).read_text()), config_path)
    gpus = int(kwargs["processes"])
    maximum_jobs = math.ceil(int(n_workers) / gpus) if n_workers else int(options["maximum-jobs"])
    minimum_jobs = min(int(options["minimum-jobs"]), maximum_jobs)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as err:
        raise ClusterError("--cluster slurm needs dask-jobqueue: pip install 'gradcamo-dask[hpc]'") from err
    if security is not None:
        kwargs["security"] = security
    elif options["tls"]:
        kwargs["security"] = True  # dask-jobqueue's temporary certificates (see the module docstring)
        kwargs["shared_temp_directory"] = _certificate_folder(kwargs.get("shared_temp_directory"))
    try:
        cluster = SLURMCluster(**kwargs)
    except (TypeError, ValueError) as err:
        raise ClusterError(f"dask-jobqueue rejected the jobqueue.slurm settings in {config_path}: {err}") from err
    cluster.adapt(Adaptive=ReplacingAdaptive, minimum_jobs=minimum_jobs, maximum_jobs=maximum_jobs)
    return cluster


def _known_jobqueue_keys() -> set[str]:
    """The jobqueue.slurm settings dask-jobqueue documents (its shipped defaults)."""
    try:
        import dask
        import dask_jobqueue  # noqa: F401  (registers the jobqueue defaults)
    except ImportError:
        return set()
    return set(dask.config.get("jobqueue.slurm", default={}) or {})


def _certificate_folder(shared: str | None) -> str:
    """The folder (made mode 0700 if new) for a run's temporary TLS files: ``shared`` or ``~/.gradcamo-dask/tls``.

    Home folders are shared with the compute nodes on most clusters, while
    dask-jobqueue's own default (the current folder) would put private keys beside
    the user's data. dask-jobqueue deletes the files when the cluster object goes.
    """
    base = Path(os.path.expanduser(shared or "~/.gradcamo-dask/tls"))
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return str(base)


def _jobqueue_default(key: str) -> Any:
    """dask-jobqueue's own default of ``jobqueue.slurm.<key>`` (None without dask-jobqueue)."""
    try:
        import dask
        import dask_jobqueue  # noqa: F401  (registers the jobqueue defaults)
    except ImportError:
        return None
    return dask.config.get(f"jobqueue.slurm.{key}", default=None)


def _lookup(document: dict, dotted: str) -> Any:
    node: Any = document
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
