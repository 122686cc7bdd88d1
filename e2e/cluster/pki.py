"""The control plane's own certificate authority, its serving certificates and its users' client certificates.

Every key is ECDSA P-256 (quick to make, accepted by every component). The API server
authenticates a client certificate as the user named by its CN, in the groups named by
its O fields: ``system:masters`` is the administrator; any other user has only what
RBAC grants it.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=7)


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


class Authority:
    """A CA kept in ``directory`` (``ca.crt``, ``ca.key``); it issues serving and client certificates there."""

    def __init__(self, directory: Path, *, load: bool = False) -> None:
        """A new CA in ``directory``; with ``load``, the one already there."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        if load:
            self.pair = KeyPair(directory / "ca.crt", directory / "ca.key")
            self._cert = x509.load_pem_x509_certificate(self.pair.cert.read_bytes())
            key = serialization.load_pem_private_key(self.pair.key.read_bytes(), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            self._key = key
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intercept-cluster-ca")])
        now = _now()
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.pair = self._write("ca", self._cert, self._key)

    @property
    def cert(self) -> Path:
        return self.pair.cert

    def serving(self, name: str, hosts: list[str]) -> KeyPair:
        """A server certificate for ``hosts`` (DNS names and IP addresses)."""
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        return self._issue(name, name, [], [ExtendedKeyUsageOID.SERVER_AUTH], sans)

    def client(self, name: str, user: str, groups: list[str] | tuple[str, ...] = ()) -> KeyPair:
        """A client certificate: the API server sees user ``user`` in ``groups``."""
        return self._issue(name, user, list(groups), [ExtendedKeyUsageOID.CLIENT_AUTH], [])

    def _issue(self, name: str, cn: str, organizations: list[str], usages: list[x509.ObjectIdentifier],
               sans: list[x509.GeneralName]) -> KeyPair:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([*(x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations),
                             x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return self._write(name, builder.sign(self._key, hashes.SHA256()), key)

    def _write(self, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> KeyPair:
        pair = KeyPair(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.touch(mode=0o600)
        pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return pair


def signing_key(path: Path) -> KeyPair:
    """A service-account token signing key: ``path`` (PEM, PKCS#8) and its public key beside it (``.pub``).

    The ``cert`` of the returned pair is the public key (what verifies tokens).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    path.touch(mode=0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    public = path.with_suffix(".pub")
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return KeyPair(public, path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
