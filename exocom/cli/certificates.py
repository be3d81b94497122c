"""Client certificates that name roles, for `exocom demo --secure` and the
tests: trustme makes the CA and server certificates, but issues no URI SANs,
and a role is named by the URI SAN `exocom:role:NAME`. Needs trustme (and its
dependency cryptography): the [test] extra."""

from __future__ import annotations

import datetime
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def role_certificate(ca: trustme.CA, directory: Path, name: str, *roles: str) -> tuple[str, str]:
    """A client certificate signed by `ca` with a URI SAN exocom:role:ROLE per
    role (none: a certificate that names no role), written to `directory`
    as NAME.pem and NAME-key.pem; their paths."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.UniformResourceIdentifier(f"exocom:role:{role}") for role in roles] or [x509.DNSName(name)]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)
