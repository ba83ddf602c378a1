"""A local stand-in for S3: moto's S3 server over TLS on 127.0.0.1, its data in this process's memory.

The standalone cluster starts it when no AWS credentials (and no storage.endpoint_url) are configured;
the test suite runs it in-process. It is a stand-in, not S3: no durability, no IAM, data lost when it
stops. `python -m fruits.cloud.s3_standin --port P --cert C --key K` serves until killed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
from pathlib import Path


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, valid one day: what AWS_CA_BUNDLE and the JVMs' truststore trust."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def tls_aware_bucket_policies() -> None:
    """moto ignores policy conditions, so it applies a deny-non-TLS statement to every request. Every
    request to this endpoint is TLS: such statements do not apply, as on AWS."""
    from moto.iam.access_control import IAMPolicy, PermissionResult
    from moto.s3.models import FakeBucket

    non_tls = {"Bool": {"aws:SecureTransport": "false"}}

    def get_permission(bucket, action, resource):
        if bucket.policy is None:
            return PermissionResult.NEUTRAL
        policy = json.loads(bucket.policy)
        statements = [s for s in policy["Statement"] if s.get("Condition") != non_tls]
        if not statements:
            return PermissionResult.NEUTRAL
        return IAMPolicy(json.dumps({**policy, "Statement": statements})).is_action_permitted(action, resource)

    FakeBucket.get_permission = get_permission


class TlsS3Server:
    """moto's S3 in server mode on 127.0.0.1:port, over TLS, in a background thread."""

    def __init__(self, port: int, certificate: Path, key: Path):
        from moto.moto_server.threaded_moto_server import MotoRequestHandler
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", port, app, True, request_handler=MotoRequestHandler,
                                   ssl_context=(str(certificate), str(key)))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        tls_aware_bucket_policies()

    def start(self) -> TlsS3Server:
        self._thread.start()
        return self

    def wait(self) -> None:
        self._thread.join()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A local S3 stand-in (moto, TLS, in memory)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    args = parser.parse_args(argv)
    server = TlsS3Server(args.port, args.cert, args.key).start()
    print(f"S3 stand-in (moto, in memory) on https://127.0.0.1:{args.port}", flush=True)
    server.wait()


if __name__ == "__main__":
    main()
