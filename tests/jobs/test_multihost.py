"""Dask across hosts with TLS: a scheduler and two workers in their own network namespaces,
a client in a third, certificates made by the test; workers without a trusted certificate
are refused; a TLS client pointed at a non-TLS address fails clearly and quickly.

The namespaces, veths and processes are removed after the tests, also when they fail.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers.netns_lab import NetnsLab, netns_unavailable_reason, remove_stale_labs
from tests.helpers.tls_certs import write_test_pki

from tests.helpers.paths import REPO
PORT = 8786


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "10s",
    })
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(f"multi-host test needs Linux network namespaces: {reason}")
    remove_stale_labs()
    lab = NetnsLab()
    try:
        for host in ("scheduler", "worker1", "worker2", "client", "rogue"):
            lab.add_host(host)
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def pki(lab, tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    trusted = write_test_pki(directory / "trusted", {host: [address] for host, address in lab.hosts.items()})
    other = write_test_pki(directory / "other", {"rogue": [lab.hosts["rogue"]]}, ca_name="some-other-ca")
    return {"trusted": trusted, "other": other["rogue"]}


def _tls_args(files: dict[str, Path]) -> list[str]:
    return ["--tls-ca-file", str(files["ca"]), "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"])]


def _log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


@pytest.fixture(scope="module")
def tls_cluster(lab, pki, tmp_path_factory):
    """Scheduler and two workers, each in its own namespace, TLS only."""
    logs = tmp_path_factory.mktemp("logs")
    certs = pki["trusted"]
    scheduler_address = f"tls://{lab.hosts['scheduler']}:{PORT}"
    scheduler = lab.popen("scheduler", [
        sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", lab.hosts["scheduler"],
        "--port", str(PORT), "--protocol", "tls", "--no-dashboard", *_tls_args(certs["scheduler"]),
    ], env=_env(), log=logs / "scheduler.log")
    workers = []
    for host in ("worker1", "worker2"):
        workers.append(lab.popen(host, [
            sys.executable, "-m", "distributed.cli.dask_worker", scheduler_address, "--host", lab.hosts[host],
            "--name", host, "--nthreads", "4", "--resources", "GPU=1", "--no-nanny", "--no-dashboard",
            "--death-timeout", "120",
            *_tls_args(certs[host]),
        ], env=_env(), log=logs / f"{host}.log"))
    info = {"address": scheduler_address, "logs": logs, "processes": [scheduler, *workers]}
    # Ready when the client namespace sees both workers (checked over TLS).
    result = run_client(lab, pki, "client.wait_for_workers(2, timeout=90); emit(sorted(client.scheduler_info()['workers']))",
                        scheduler_address, timeout=150)
    if result.returncode != 0:
        pytest.fail("the TLS cluster did not start:\n" + result.stderr[-3000:] + "\n--- scheduler\n"
                    + _log_tail(logs / "scheduler.log") + "\n--- worker1\n" + _log_tail(logs / "worker1.log"))
    info["workers"] = _last_json(result)
    yield info
    for process in info["processes"]:
        lab.stop(process)


_CLIENT_PRELUDE = textwrap.dedent("""
    import argparse, json, sys
    from gradcamo_dask.cli.options import add_cluster_options, connect
    def emit(value):
        print("RESULT " + json.dumps(value), flush=True)
    parser = argparse.ArgumentParser()
    add_cluster_options(parser)
    client = connect(parser.parse_args(["--scheduler", sys.argv[4], "--tls-ca-file", sys.argv[1], "--tls-cert",
                                        sys.argv[2], "--tls-key", sys.argv[3], "--timeout", "20"]))
""")


def run_client(lab, pki, body: str, address: str, *, host: str = "client", timeout: float = 120):
    """Run ``body`` in a Python process inside ``host``'s namespace with a TLS ``client``."""
    files = pki["trusted"][host]
    code = _CLIENT_PRELUDE + textwrap.dedent(body) + "\nclient.close()\n"
    return lab.run(host, [sys.executable, "-c", code, str(files["ca"]), str(files["cert"]), str(files["key"]),
                          address], env=_env(), timeout=timeout)


def _last_json(result):
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result printed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_lab_is_removed_even_when_the_test_body_fails(lab):
    # Same clean-up path as the module's lab: processes stopped, namespaces (and veths) gone.
    other = NetnsLab(subnet="10.78.0")
    with pytest.raises(RuntimeError, match="test body failed"):
        with other:
            other.add_host("a")
            sleeper = other.popen("a", ["sleep", "300"], env=_env(), log=Path(os.devnull))
            assert len(other.namespace_names()) == 2
            raise RuntimeError("test body failed")
    assert other.namespace_names() == [] and sleeper.poll() is not None


def test_dask_computation_across_three_namespaces_over_tls(lab, pki, tls_cluster):
    workers = tls_cluster["workers"]
    assert len(workers) == 2 and all(w.startswith("tls://") for w in workers)
    hosts = sorted(w.split("://")[1].rsplit(":", 1)[0] for w in workers)
    assert hosts == sorted([lab.hosts["worker1"], lab.hosts["worker2"]])
    result = run_client(lab, pki, """
        import dask.array as da
        import numpy as np
        from distributed import get_worker
        x = da.arange(200_000, chunks=20_000, dtype="float64")
        total = float((x ** 2).sum().compute())
        ran_on = {}
        for w in sorted(client.scheduler_info()["workers"]):
            ran_on[w] = client.submit(lambda i: (get_worker().address, i * 3), 7, workers=[w], pure=False).result()
        emit({"total": total, "ran_on": ran_on, "client_address": client.scheduler.address})
    """, tls_cluster["address"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = _last_json(result)
    expected = float(sum(float(i) ** 2 for i in range(200_000)))
    assert out["total"] == pytest.approx(expected, rel=1e-12)
    assert out["client_address"].startswith("tls://")
    # Each worker ran its own task: the work really crossed to both hosts.
    assert {w: v[0] for w, v in out["ran_on"].items()} == {w: w for w in workers}
    assert all(v[1] == 21 for v in out["ran_on"].values())


def _scheduler_worker_count(lab, pki, tls_cluster) -> int:
    result = run_client(lab, pki, "emit(len(client.scheduler_info()['workers']))", tls_cluster["address"])
    assert result.returncode == 0, result.stderr[-3000:]
    return _last_json(result)


_RAW_TLS_PEER = textwrap.dedent("""
    import socket, ssl, sys
    ctx = ssl.create_default_context(cafile=sys.argv[1])
    ctx.check_hostname = False
    if len(sys.argv) > 4:
        ctx.load_cert_chain(sys.argv[4], sys.argv[5])
    try:
        with socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=10) as raw:
            with ctx.wrap_socket(raw) as tls:
                tls.settimeout(3)
                try:
                    data = tls.recv(16)  # an accepted peer gets the scheduler's comm handshake
                except socket.timeout:
                    print("OPEN")
                else:
                    print("CLOSED" if not data else "DATA")
    except (ssl.SSLError, ConnectionError, OSError) as err:
        print("REFUSED", type(err).__name__, err)
""")


def test_peer_without_certificate_is_refused_by_the_scheduler(lab, pki, tls_cluster):
    # A peer that trusts the CA but presents no certificate of its own: the scheduler ends the
    # connection (mutual TLS). Control: the same peer with a trusted certificate is accepted and
    # receives the scheduler's first message (Dask's comm handshake).
    files = pki["trusted"]["rogue"]
    base = [sys.executable, "-c", _RAW_TLS_PEER, str(files["ca"]), lab.hosts["scheduler"], str(PORT)]
    without = lab.run("rogue", base, env=_env(), timeout=60)
    with_cert = lab.run("rogue", [*base, str(files["cert"]), str(files["key"])], env=_env(), timeout=60)
    assert with_cert.stdout.strip() == "DATA", with_cert.stdout + with_cert.stderr
    assert without.stdout.startswith(("REFUSED", "CLOSED")), without.stdout + without.stderr
    # TLS 1.3 names the missing certificate in its alert; under load the close may be read first.
    assert "DATA" not in without.stdout


@pytest.mark.parametrize("case", ["no certificate (plain tcp)", "certificate from another CA"])
def test_worker_without_trusted_certificate_is_refused(lab, pki, tls_cluster, case):
    address = tls_cluster["address"]
    argv = [sys.executable, "-m", "distributed.cli.dask_worker"]
    if case == "no certificate (plain tcp)":
        # Encryption not required on this worker, so it really tries plain TCP.
        env = _env(DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION="False")
        argv += [address.replace("tls://", "tcp://")]
    else:
        env = _env()
        argv += [address, *_tls_args(pki["other"])]
    argv += ["--host", lab.hosts["rogue"], "--name", "rogue", "--nthreads", "1", "--no-nanny", "--no-dashboard",
             "--death-timeout", "8"]
    started = time.monotonic()
    result = lab.run("rogue", argv, env=env, timeout=60)
    assert result.returncode != 0, result.stderr[-2000:]
    assert time.monotonic() - started < 55  # gave up by itself (death timeout), no hang
    assert "Registered to" not in result.stderr and "Timed out starting worker" in result.stderr
    assert _scheduler_worker_count(lab, pki, tls_cluster) == 2
    registered = [line for line in _log_tail(tls_cluster["logs"] / "scheduler.log", 500).splitlines()
                  if "Register worker" in line]
    assert len(registered) == 2 and not any(lab.hosts["rogue"] in line for line in registered), registered


# --------------------------------------------------------------------------- no namespaces needed

@pytest.fixture
def local_pki(tmp_path):
    return write_test_pki(tmp_path / "pki", {"client": ["127.0.0.1"]})["client"]


def _cli_connect(address: str, pki: dict, timeout: float):
    """Connect as `gradcamo-dask score --scheduler ADDRESS --tls-*` does (the CLI's own code path)."""
    import argparse

    from gradcamo_dask.cli.options import add_cluster_options, connect

    parser = argparse.ArgumentParser()
    add_cluster_options(parser)
    return connect(parser.parse_args(["--scheduler", address, "--tls-ca-file", str(pki["ca"]), "--tls-cert",
                                      str(pki["cert"]), "--tls-key", str(pki["key"]), "--timeout", str(timeout)]))


def test_tls_client_to_a_plain_tcp_scheduler_fails_clearly_and_quickly(local_pki):
    from distributed import LocalCluster

    from gradcamo_dask.errors import ClusterError

    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=None) as plain:
        port = plain.scheduler_address.rsplit(":", 1)[1]
        started = time.monotonic()
        with pytest.raises(ClusterError, match=r"no TLS connection to the Dask scheduler at tls://127\.0\.0\.1"):
            _cli_connect(f"tls://127.0.0.1:{port}", local_pki, 3)
        assert time.monotonic() - started < 30
        # A tcp:// address while TLS is required: refused before connecting.
        with pytest.raises(ClusterError, match="is not a TLS address but --tls-\\* options require encryption"):
            _cli_connect(plain.scheduler_address, local_pki, 3)


def test_tls_client_to_a_silent_listener_times_out_clearly(local_pki):
    # A peer that accepts TCP and never answers the TLS handshake (a firewall, a wrong port).
    import socket
    import threading

    from gradcamo_dask.errors import ClusterError

    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        with pytest.raises(ClusterError, match="no TLS connection .* within 2 s"):
            _cli_connect(f"tls://127.0.0.1:{listener.getsockname()[1]}", local_pki, 2)
        assert time.monotonic() - started < 20 and accepted
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in accepted:
            connection.close()
        listener.close()


def test_tls_options_name_a_missing_file(local_pki, tmp_path):
    from gradcamo_dask.errors import ClusterError
    from gradcamo_dask.jobs.tls import tls_security

    with pytest.raises(ClusterError, match=r"--tls-cert .*absent\.pem: no such file"):
        tls_security(local_pki["ca"], tmp_path / "absent.pem", local_pki["key"])
    assert tls_security(local_pki["ca"], local_pki["cert"], local_pki["key"]).require_encryption


# --------------------------------------------------------------------------- a plate across hosts

@pytest.fixture(scope="module")
def tiny(tiny_plate):
    return tiny_plate


def _score_from_client_namespace(lab, pki, tls_cluster, tiny, out: str):
    files = pki["trusted"]["client"]
    return lab.run("client", [
        sys.executable, "-m", "gradcamo_dask.cli", "score", str(tiny["plate"]), "--labels", str(tiny["plate"]),
        "--model", str(tiny["bundle"]), "--out", out, "--scheduler", tls_cluster["address"],
        "--tls-ca-file", str(files["ca"]), "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]), "--quiet",
    ], env=_env(), timeout=400)


def test_plate_scored_across_hosts_over_tls_equals_local_run(lab, pki, tls_cluster, tiny):
    import numpy as np
    import xarray as xr

    out = tiny["plate"].parent / "multihost.zarr"
    result = _score_from_client_namespace(lab, pki, tls_cluster, tiny, str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert f"scheduler {tls_cluster['address']}" in result.stderr  # joined the TLS cluster, started none
    remote = xr.open_zarr(out, consolidated=False).load()
    local = xr.open_zarr(tiny["local"], consolidated=False).load()
    assert remote.sizes["cell"] == local.sizes["cell"] > 0
    for key in ("well", "site", "object_number"):
        np.testing.assert_array_equal(remote[key].values, local[key].values)
    for name in ("gradcamo", "cam_inside", "cam_total", "logits", "deep"):
        np.testing.assert_allclose(remote[name].values, local[name].values, rtol=1e-4, atol=1e-6,
                                   equal_nan=True, err_msg=name)
    np.testing.assert_array_equal(remote["predicted"].values, local["predicted"].values)


def test_unwritable_output_stops_before_scoring(lab, pki, tls_cluster, tiny):
    out = "/proc/gradcamo-not-writable/profiles.zarr"  # not writable on any host, not even for root
    result = _score_from_client_namespace(lab, pki, tls_cluster, tiny, out)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "OutputStoreError" in result.stderr and "not writable from 2 of 2 Dask workers" in result.stderr
    assert "wrote" not in result.stdout
