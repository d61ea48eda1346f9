"""TLS between the client, the scheduler and the workers of a Dask cluster across hosts.

``gradcamo-dask score --tls-ca-file CA --tls-cert CERT --tls-key KEY`` builds a
:class:`distributed.security.Security` with :func:`tls_security` (encryption required:
plain ``tcp://`` is refused) and opens the client with :func:`open_tls_client`, which
turns the ways a TLS connection fails into one :class:`ClusterError` that says what to
check, within a bounded time, instead of a traceback or a hang.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gradcamo_dask.errors import ClusterError
from gradcamo_dask.jobs.client import open_client


def tls_security(ca_file: str | os.PathLike, cert: str | os.PathLike, key: str | os.PathLike | None = None,
                 *, all_roles: bool = False) -> Any:
    """A :class:`distributed.security.Security` with encryption required: a client's, or every role's.

    Parameters
    ----------
    ca_file
        PEM file of the certificate authority that signed every host's certificate.
    cert, key
        This host's PEM certificate and private key (``key`` may be omitted when
        ``cert`` holds both).
    all_roles
        Also use ``cert``/``key`` as the scheduler's and the workers' certificate: what
        a cluster started from this process needs (``--cluster slurm``: the scheduler
        runs here and the workers get the paths on their command line). A client-only
        Security there fails with ``TLS expects a ssl_context`` and ``--tls-cert None``.

    Raises
    ------
    ClusterError
        A file is missing or unreadable; names the option and the path.
    """
    from distributed.security import Security

    for option, path in (("--tls-ca-file", ca_file), ("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not Path(path).is_file():
            raise ClusterError(f"{option} {path}: no such file; pass the PEM files of the cluster's TLS "
                               "certificate authority and of this host (see deploy/README.md, 'TLS')")
    roles = ("client", "scheduler", "worker") if all_roles else ("client",)
    paths = {"tls_ca_file": str(ca_file)}
    for role in roles:
        paths[f"tls_{role}_cert"] = str(cert)
        if key is not None:
            paths[f"tls_{role}_key"] = str(key)
    return Security(require_encryption=True, **paths)


def open_tls_client(address: str, security: Any, *, timeout_s: float = 30.0, **client_kwargs: Any) -> Any:
    """Connect a :class:`distributed.Client` to ``address`` over TLS, failing clearly.

    Parameters
    ----------
    address
        The scheduler, ``tls://host:port``; a bare ``host:port`` gets ``tls://``.
    security
        From :func:`tls_security` (or any ``Security`` with ``require_encryption``).
    timeout_s
        Give up after this many seconds (a peer that does not speak TLS may accept the
        TCP connection and never answer the handshake).

    Raises
    ------
    ClusterError
        The address is not TLS, the peer does not complete a TLS handshake, or the
        certificates do not match; the message names the address and what to check.
    """
    if "://" not in address:
        address = f"tls://{address}"
    if not address.startswith("tls://"):
        raise ClusterError(f"the scheduler address {address} is not TLS but TLS is required (--tls-* options "
                           "given): use tls://host:port, and start the scheduler with --tls-ca-file/--tls-cert/"
                           "--tls-key")
    try:
        return open_client(address, security=security, timeout=timeout_s, **client_kwargs)
    except (OSError, TimeoutError, RuntimeError, ValueError) as err:
        raise ClusterError(
            f"no TLS connection to the Dask scheduler at {address} within {timeout_s:g} s "
            f"({type(err).__name__}: {err}); check that a scheduler listens there with TLS (started with "
            "--tls-ca-file, --tls-cert and --tls-key, address tls://...), and that its certificate and yours "
            "are signed by the CA given with --tls-ca-file") from err
