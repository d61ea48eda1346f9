"""Opening a :class:`distributed.Client` without leaving a half-made one behind when it fails."""

from __future__ import annotations

from contextlib import suppress
from functools import cache
from typing import Any

CLOSE_TIMEOUT_S = 5.0


def open_client(*args: Any, **kwargs: Any) -> Any:
    """``distributed.Client(*args, **kwargs)``; when that raises, the process is left as it was found.

    A Client makes itself the process's default and sets dask's ``scheduler`` to ``"dask.distributed"``
    *before* it connects, and distributed (2026.x) closes it again only when the connection fails with
    ``OSError``. Any other failure (a ``ValueError`` or ``RuntimeError`` from a garbled handshake, an
    interrupt) leaves a default client that never connected, and every later ``.compute()`` in the process
    fails with "Requested dask.distributed scheduler but no Client active" once it is collected (CI, stop 24:
    86 tests after one such failure). Here that client closes itself and the setting is put back.
    """
    import dask

    setting = dask.config.get("scheduler", None)
    try:
        return _closing_client_class()(*args, **kwargs)
    except BaseException:
        if setting is None:
            dask.config.config.pop("scheduler", None)
        else:
            dask.config.set(scheduler=setting)
        raise


@cache
def _closing_client_class() -> type:
    from distributed import Client

    class ClosingClient(Client):
        """A Client that closes itself (and so stops being the default) when it cannot start."""

        def start(self, **kwargs: Any) -> None:
            try:
                super().start(**kwargs)
            except BaseException:
                with suppress(Exception):
                    self.close(timeout=CLOSE_TIMEOUT_S)
                raise

    return ClosingClient
