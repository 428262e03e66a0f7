"""A throw-away PKI for TLS tests: a CA, a server certificate for 127.0.0.1 (IP SAN) and a client certificate.

Made with the `openssl` command line (the project's dependencies do not include `cryptography`); tests that need
it are skipped where the command is missing. EC P-256 keys, valid for two days, authority/subject key ids set so
strict X.509 verification (Python 3.13's default) accepts them too.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_CONFIG = """\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = placeholder

[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash

[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_context(self) -> ssl.SSLContext:
        """A server context that requires a client certificate signed by the CA (mTLS)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.server_cert, self.server_key)
        context.load_verify_locations(cafile=self.ca)
        context.verify_mode = ssl.CERT_REQUIRED
        return context


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _issue(directory: Path, name: str, subject: str, extensions: str) -> tuple[Path, Path]:
    cert, key, csr = directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.csr"
    _openssl("req", "-new", *_KEY, "-keyout", key.name, "-out", csr.name, "-config", "openssl.cnf",
             "-subj", subject, cwd=directory)  # fmt: skip
    _openssl("x509", "-req", "-in", csr.name, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-sha256", "-extfile", "openssl.cnf", "-extensions", extensions, "-out", cert.name,
             cwd=directory)  # fmt: skip
    return cert, key


def make_pki(directory: Path) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "openssl.cnf").write_text(_CONFIG)
    _openssl("req", "-x509", "-new", *_KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-sha256",
             "-config", "openssl.cnf", "-extensions", "ca", "-subj", "/CN=llm-gateway outbound test CA",
             cwd=directory)  # fmt: skip
    server_cert, server_key = _issue(directory, "server", "/CN=127.0.0.1", "server")
    client_cert, client_key = _issue(directory, "client", "/CN=llm-gateway test client", "client")
    return Pki(directory / "ca.pem", server_cert, server_key, client_cert, client_key)
