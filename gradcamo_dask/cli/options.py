"""Options and checks shared by several commands: output paths, whole numbers, the Dask cluster."""

from __future__ import annotations

import argparse


def positive(**options: int | None) -> None:
    """Refuse option values below 1 (``--batch-size 0``) before anything is read or written."""
    from gradcamo_dask.errors import InputError

    for name, value in options.items():
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} must be a whole number >= 1, got {value}; nothing was read or written")


def check_out(out: str, option: str = "--out", **inputs: str | None) -> str:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (real paths, links followed)."""
    from gradcamo_dask.io.safety import check_output_path

    return check_output_path(out, inputs, option=option)


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Dask cluster (default: a local cluster sized to this machine, "
                                      "one worker per GPU when CUDA GPUs are present)")
    group.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="join a running Dask scheduler (tcp://host:port, tls://host:port or a scheduler JSON file)")
    group.add_argument("--timeout", type=float, default=20.0, metavar="SECONDS",
                       help="give up on a --scheduler that does not answer as a Dask scheduler after this long "
                       "(default 20)")
    group.add_argument("--worker-timeout", type=float, default=None, metavar="SECONDS",
                       help="how long to wait, saying so, for a first worker (0: no limit; default 600 for a "
                       "--scheduler, no limit for --cluster slurm, whose jobs may queue for hours)")
    group.add_argument("--cluster", choices=["local", "slurm"], default=None,
                       help="cluster to start when no --scheduler is given (default local)")
    group.add_argument("--cluster-config", default=None, metavar="PATH", help="settings of the SLURM cluster (YAML)")
    group.add_argument("--workers", type=int, default=None,
                       help="worker processes of a local CPU cluster; with --cluster slurm, the most GPU workers")
    group.add_argument("--tls-ca-file", default=None, help="TLS: CA certificate (PEM) of the cluster")
    group.add_argument("--tls-cert", default=None, help="TLS: this host's certificate (PEM); with --cluster slurm "
                       "also the scheduler's and the workers' (default there: temporary certificates)")
    group.add_argument("--tls-key", default=None, help="TLS: private key (PEM) of --tls-cert")


def tls_requested(args: argparse.Namespace) -> bool:
    return bool(args.tls_ca_file or args.tls_cert or args.tls_key)


def cluster_security(args: argparse.Namespace):
    """The TLS settings of the --tls-* options (None without them); ClusterError names a missing option or file.

    With ``--cluster slurm`` the scheduler runs in this process and the workers get
    the certificate paths, so the Security covers every role; without --tls-* options
    the SLURM cluster uses temporary certificates (:mod:`gradcamo_dask.jobs.slurm`).
    """
    if not tls_requested(args):
        return None
    from gradcamo_dask.errors import ClusterError
    from gradcamo_dask.jobs.tls import tls_security

    if not (args.tls_ca_file and args.tls_cert):
        raise ClusterError("TLS needs both --tls-ca-file and --tls-cert (and --tls-key unless the certificate file "
                           "holds the key)")
    return tls_security(args.tls_ca_file, args.tls_cert, args.tls_key, all_roles=args.cluster == "slurm")


def connect(args: argparse.Namespace):
    from gradcamo_dask.errors import ClusterError, InputError
    from gradcamo_dask.jobs.cluster import connect

    security = cluster_security(args)
    address = str(args.scheduler or "")
    if security is not None and "://" in address and not address.startswith("tls://"):
        raise ClusterError(f"--scheduler {address} is not a TLS address but --tls-* options require encryption; "
                           f"use tls://{address.split('://', 1)[1]} (a scheduler started with --protocol tls) or "
                           "drop the --tls-* options")
    for flag, value in (("--timeout", args.timeout), ("--worker-timeout", args.worker_timeout)):
        if value is not None and not value >= 0:
            raise InputError(f"{flag} must be a number of seconds >= 0, got {value}")
    return connect(args.scheduler, cluster=args.cluster, cluster_config=args.cluster_config, n_workers=args.workers,
                   security=security, timeout=args.timeout, worker_timeout=first_worker_wait(args))


def first_worker_wait(args: argparse.Namespace) -> float | None:
    """Seconds to wait for a first worker (None: no limit): --worker-timeout, 0 = no limit, default by cluster."""
    from gradcamo_dask.jobs.cluster import DEFAULT_WORKER_TIMEOUT_S

    if args.worker_timeout is None:
        return None if args.cluster == "slurm" else DEFAULT_WORKER_TIMEOUT_S
    return None if args.worker_timeout == 0 else float(args.worker_timeout)
