"""The node's cluster DNS: Service names for the pods, and NXDOMAIN at once for anything else (stdlib only).

    python -m e2e.cluster.dns --kubeconfig FILE --listen IP        (port 53, UDP and TCP)

For ``A`` questions (``AAAA`` and others get an empty answer for a name that exists):

- ``SERVICE.NAMESPACE.svc.cluster.local``: the Service's ClusterIP; for a headless Service,
  the address of every ready endpoint (its EndpointSlices);
- ``HOSTNAME.SERVICE.NAMESPACE.svc.cluster.local``: the endpoint of that hostname (a
  StatefulSet's pod, by its Service);
- anything else: NXDOMAIN, answered at once, so no query leaves the machine.

Each question is answered from the API server as it is asked (no cache, no lag behind a
rollout). Prints ``dns: serving *.svc.cluster.local on IP:53`` once listening.
"""

from __future__ import annotations

import argparse
import logging
import socket
import socketserver
import struct
import sys
import threading

import yaml

from e2e.cluster.api import API, APIError

log = logging.getLogger(__name__)

DOMAIN = ("svc", "cluster", "local")
TTL = 5
A, AAAA = 1, 28
NOERROR, FORMERR, SERVFAIL, NXDOMAIN = 0, 1, 2, 3


class Resolver:
    """Names of the cluster's Services, read from the API server per question."""

    def __init__(self, api: API) -> None:
        self.api = api

    def addresses(self, labels: list[str]) -> list[str] | None:
        """The IPv4 addresses of a name (its labels, lowercase, domain removed), or None: no such name."""
        if len(labels) == 2:
            service, namespace, hostname = labels[0], labels[1], None
        elif len(labels) == 3:
            hostname, service, namespace = labels
        else:
            return None
        try:
            svc = self.api.get(f"/api/v1/namespaces/{namespace}/services/{service}")
        except APIError:
            return None
        cluster_ip = (svc.get("spec") or {}).get("clusterIP")
        if hostname is None and cluster_ip and cluster_ip != "None":
            return [cluster_ip]
        slices = self.api.get(f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                              labelSelector=f"kubernetes.io/service-name={service}").get("items") or []
        found = [address for s in slices if s.get("addressType") == "IPv4" for e in s.get("endpoints") or []
                 if (e.get("conditions") or {}).get("ready") is not False
                 and (hostname is None or e.get("hostname") == hostname)
                 for address in e.get("addresses") or []]
        return sorted(set(found)) if found or hostname is None else None

    def answer(self, query: bytes) -> bytes:
        """The response to one DNS message."""
        try:
            ident, flags, questions = struct.unpack("!HHH", query[:6])
            labels, end = _name(query, 12)
            qtype, qclass = struct.unpack("!HH", query[end:end + 4])
        except (struct.error, IndexError, ValueError):
            return query[:2] + struct.pack("!HHHHH", 0x8000 | FORMERR, 0, 0, 0, 0) if len(query) >= 2 else b""
        question = query[12:end + 4]
        lowered = [label.lower() for label in labels]
        found = None
        code = NXDOMAIN
        if tuple(lowered[-3:]) == DOMAIN:
            try:
                found = self.addresses(lowered[:-3])
                code = NOERROR if found is not None else NXDOMAIN
            except Exception as error:  # noqa: BLE001 - the API server did not answer: say so, do not hang
                log.warning("dns: %s: %s", ".".join(labels), error)
                code = SERVFAIL
        records = b""
        count = 0
        if found and qtype == A:
            for address in found:
                records += b"\xc0\x0c" + struct.pack("!HHIH", A, 1, TTL, 4) + socket.inet_aton(address)
                count += 1
        recursion = flags & 0x0100
        header = struct.pack("!HHHHHH", ident, 0x8000 | 0x0400 | recursion | 0x0080 | code, 1, count, 0, 0)
        return header + question + records


def _name(message: bytes, offset: int) -> tuple[list[str], int]:
    """The labels of the (uncompressed) name at ``offset``, and where it ends."""
    labels = []
    while True:
        length = message[offset]
        if length == 0:
            return labels, offset + 1
        if length & 0xC0:
            raise ValueError("a compressed name in a question")
        labels.append(message[offset + 1:offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length


def serve(resolver: Resolver, address: str, port: int = 53) -> list[socketserver.BaseServer]:
    class UDP(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            sock.sendto(resolver.answer(data), self.client_address)

    class TCP(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while header := self.rfile.read(2):
                if len(header) < 2:
                    return
                (length,) = struct.unpack("!H", header)
                response = resolver.answer(self.rfile.read(length))
                self.wfile.write(struct.pack("!H", len(response)) + response)

    class ThreadingUDP(socketserver.ThreadingUDPServer):
        daemon_threads = True
        allow_reuse_address = True

    class ThreadingTCP(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    servers: list[socketserver.BaseServer] = [ThreadingUDP((address, port), UDP), ThreadingTCP((address, port), TCP)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    return servers


def api_from(kubeconfig: str) -> API:
    config = yaml.safe_load(open(kubeconfig))
    cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
    return API(cluster["server"], cluster["certificate-authority"], user["client-certificate"], user["client-key"])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster.dns")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--port", type=int, default=53)
    options = parser.parse_args(argv)
    serve(Resolver(api_from(options.kubeconfig)), options.listen, options.port)
    print(f"dns: serving *.{'.'.join(DOMAIN)} on {options.listen}:{options.port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
