"""A throwaway PKI made with the ``openssl`` command at test time: a CA, a
server certificate for 127.0.0.1/localhost, and client certificates.  No
private key is ever committed; docs/security.md shows the same commands."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    def client(self, name: str, *, ca: "Pki | None" = None) -> tuple[Path, Path]:
        """(cert, key) of a client certificate with CN ``name``, signed by this CA (or ``ca``)."""
        signer = ca or self
        key, cert = self.dir / f"{name}.key", self.dir / f"{name}.crt"
        csr = self.dir / f"{name}.csr"
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        ext = self.dir / f"{name}.ext"
        ext.write_text("extendedKeyUsage=clientAuth\n")
        _openssl("x509", "-req", "-in", csr, "-CA", signer.ca_cert, "-CAkey", signer.ca_key,
                 "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext)
        return cert, key


def _openssl(*args) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def make_pki(directory: Path, name: str = "edgeroute-test") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", ca_key, "-out", ca_cert, "-days", "2", "-subj", f"/CN={name} CA")
    server_key, server_cert = directory / "server.key", directory / "server.crt"
    csr = directory / "server.csr"
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", server_key, "-out", csr, "-subj", "/CN=localhost")
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
             "-out", server_cert, "-days", "2", "-extfile", ext)
    return Pki(directory, ca_cert, ca_key, server_cert, server_key)
