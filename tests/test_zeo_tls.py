"""``snaptree serve`` with TLS: holders of a client certificate get in, others do not."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import snaptree
from _servers import ZeoProcess
from snaptree import OpenError

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make certificates"
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(where: Path) -> None:
    """A CA, and a server and a client certificate it signed (the server's for 127.0.0.1).

    Python's ssl refuses a CA certificate without the keyUsage extension
    ("CA cert does not include key usage extension"); ZEO's server then
    drops the connection without a word, so the CA here has one.
    """
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=snaptree test CA"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=where,
    )
    (where / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    (where / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    _openssl(  # a certificate of its own making, which our CA never signed
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-keyout", "stranger.key", "-out", "stranger.pem", "-subj", "/CN=stranger"),
        cwd=where,
    )
    for name in ("server", "client"):
        _openssl(
            *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key"),
            *("-out", f"{name}.csr", "-subj", f"/CN=snaptree test {name}"),
            cwd=where,
        )
        _openssl(
            *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key"),
            *("-CAcreateserial", "-days", "2", "-out", f"{name}.pem"),
            *("-extfile", f"{name}.ext"),
            cwd=where,
        )


def client_config(where: Path, port: int, name: str, certificate: str, key: str) -> str:
    """A ZConfig file for a TLS ZEO client, as the scale-out docs show; its zconfig:// URI."""
    config = where / f"{name}.conf"
    config.write_text(
        "%import ZEO\n"
        "<clientstorage>\n"
        f"  server 127.0.0.1:{port}\n"
        "  wait-timeout 5\n"
        "  <ssl>\n"
        f"    certificate {where / certificate}\n"
        f"    key {where / key}\n"
        f"    authenticate {where / 'ca.pem'}\n"
        "  </ssl>\n"
        "</clientstorage>\n"
    )
    return f"zconfig://{config}"


@pytest.mark.slow
def test_tls_server_serves_certificate_holders_and_refuses_others(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certificates(certs)
    server = ZeoProcess(tmp_path / "Data.fs", tmp_path / "server.log")
    server.start(
        0,
        *("--tls-certificate", str(certs / "server.pem")),
        *("--tls-key", str(certs / "server.key")),
        *("--tls-authenticate", str(certs / "ca.pem")),
    )
    try:
        trusted = client_config(certs, server.port, "client", "client.pem", "client.key")
        with snaptree.open(trusted) as store:
            store.run(lambda root: root.update(secret={"n": 1}))
            assert store.run(lambda root: root["secret"]["n"]) == 1

        stranger = client_config(certs, server.port, "stranger", "stranger.pem", "stranger.key")
        with pytest.raises(OpenError, match=r"timed out|no ZEO server answered"):
            snaptree.open(stranger)
    finally:
        assert server.stop() == 0, server.log()
