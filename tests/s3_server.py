"""A real S3-protocol server on 127.0.0.1 for the tests: moto's standalone server
(``moto[server]`` from PyPI, ``python -m moto.server``), run as its own process so a test can stop
it (the fault test) and start it again. Why moto: it speaks the S3 REST API over HTTP (the same
requests pyarrow's C++ client, botocore and MLflow send), installs from PyPI in seconds with no
binary download, and needs no disk; its state is in memory, so a restarted server is empty (the
fault test creates the bucket and uploads the inputs again).

The environment a test gets is the standard one the platform reads: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` (and
``AWS_EC2_METADATA_DISABLED`` so no client ever asks an instance-metadata address).
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "AWS_EC2_METADATA_DISABLED")


@contextlib.contextmanager
def server_env(srv: "S3Server"):
    """``srv``'s variables (:meth:`S3Server.env`) in ``os.environ`` for the block; the previous
    values of :data:`ENV_KEYS` are put back (or removed) after it."""
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    os.environ.update(srv.env())
    try:
        yield srv
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """``moto.server`` on 127.0.0.1:``port`` in a child process; :meth:`env` is what a client needs."""

    def __init__(self, port: Optional[int] = None, log: Optional[Path] = None):
        self.port = port or free_port()
        self.log = log
        self.proc: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout_s: float = 30.0) -> "S3Server":
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not listen on {self.port} within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def snapshot(self) -> dict:
        """Every bucket and object: {bucket: {key: bytes}} (moto keeps its state in memory only;
        :meth:`restore` after a restart puts it back, as a persistent server would have it)."""
        c = self.client()
        return {b["Name"]: {k: c.get_object(Bucket=b["Name"], Key=k)["Body"].read() for k in self.keys(b["Name"])}
                for b in c.list_buckets()["Buckets"]}

    def restore(self, snapshot: dict) -> None:
        c = self.client()
        for bucket, objects in snapshot.items():
            c.create_bucket(Bucket=bucket)
            for key, body in objects.items():
                c.put_object(Bucket=bucket, Key=key, Body=body)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` in ``bucket``."""
        keys, token = [], None
        c = self.client()
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            page = c.list_objects_v2(**kw)
            keys += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]
