"""Throwaway TLS material for the tests: an authority (trustme) and a server certificate it signed
for 127.0.0.1 and localhost, written as PEM files."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
import trustme


@dataclass(frozen=True)
class Tls:
    """The authority's certificate (`ca_file`, what clients trust) and the server's chain and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def context(self) -> ssl.SSLContext:
        """A client context trusting the authority."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials trusting the authority."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca_file.read_bytes())


def make_tls(folder: Path) -> Tls:
    """Write a new authority and a server certificate into `folder`."""
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    tls = Tls(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    authority.cert_pem.write_to_path(str(tls.ca_file))
    certificate.private_key_pem.write_to_path(str(tls.key_file))
    certificate.cert_chain_pems[0].write_to_path(str(tls.cert_file))
    for extra in certificate.cert_chain_pems[1:]:
        extra.write_to_path(str(tls.cert_file), append=True)
    return tls
