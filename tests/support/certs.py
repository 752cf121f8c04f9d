"""Test certificates for mutual TLS, made with the `openssl` command (skipped without it):
a CA and leaf certificates it signed, each usable as server and client."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess

import pytest

from shardline.transport.tcp import TlsConfig

_LEAF_EXTENSIONS = """\
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
subjectAltName=IP:127.0.0.1
"""


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclasses.dataclass
class CertificateAuthority:
    """A CA in `folder` (ca.pem, ca.key) that signs leaf certificates."""

    folder: pathlib.Path
    name: str

    @property
    def ca_certs(self) -> str:
        return str(self.folder / "ca.pem")

    def leaf(self, name: str) -> TlsConfig:
        """A certificate and key for `name`, signed by this CA, with this CA as trust root."""
        folder = self.folder
        (folder / "leaf.ext").write_text(_LEAF_EXTENSIONS)
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
                 cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "leaf.ext",
                 cwd=folder)  # fmt: skip
        return TlsConfig(str(folder / f"{name}.pem"), str(folder / f"{name}.key"), self.ca_certs)


def make_ca(folder: pathlib.Path, name: str = "test-ca") -> CertificateAuthority:
    """A fresh CA in `folder`; skips the test where `openssl` is not installed."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (it makes the test certificates)")
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)  # fmt: skip
    return CertificateAuthority(folder, name)
