"""Debian's nginx on loopback, configured by the admin guide's recipe (config/nginx-sip-refuge.conf).

The recipe is used as shipped; only what a site changes is changed here: the listening addresses (loopback and
free ports instead of 80 and 443), the certificate (a fresh self-signed one, made by openssl), and the sidecar's
port. Each replacement must hit exactly once, so a change to the recipe that breaks this test is noticed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from sip_refuge.pbx.asterisk import free_port

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "config" / "nginx-sip-refuge.conf"
PROXY_ADDRESS = "127.0.0.9"  # the recipe's proxy_bind


def self_signed(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", str(key),
                    "-out", str(cert), "-subj", f"/CN={host}", "-addext", f"subjectAltName=IP:{host}"],
                   check=True, capture_output=True)
    return cert, key


class Nginx:
    def __init__(self, folder: Path, upstream_port: int) -> None:
        if shutil.which("nginx") is None:
            raise RuntimeError("nginx is missing: apt-get install nginx (make deps)")  # a failure, never a skip
        self.folder, self.upstream_port = folder, upstream_port
        self.port, self.http_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _site(self, cert: Path, key: Path) -> str:
        text = RECIPE.read_text(encoding="utf-8")
        for old, new in (("proxy_pass http://127.0.0.1:8080;", f"proxy_pass http://127.0.0.1:{self.upstream_port};"),
                         ("listen 443 ssl;", f"listen 127.0.0.1:{self.port} ssl;"),
                         ("listen 80;", f"listen 127.0.0.1:{self.http_port};"),
                         ("/etc/ssl/sip-refuge/fullchain.pem", str(cert)),
                         ("/etc/ssl/sip-refuge/privkey.pem", str(key))):
            if text.count(old) != 1:
                raise AssertionError(f"{RECIPE} no longer has {old!r} exactly once")
            text = text.replace(old, new)
        return text

    def start(self) -> Nginx:
        self.folder.mkdir(parents=True, exist_ok=True)
        cert, key = self_signed(self.folder)
        (self.folder / "sip-refuge.conf").write_text(self._site(cert, key), encoding="utf-8")
        temp = self.folder / "temp"
        temp.mkdir(exist_ok=True)
        paths = "".join(f"    {kind}_temp_path {temp / kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                               "uwsgi", "scgi"))
        (self.folder / "nginx.conf").write_text(
            f"user root;\nworker_processes 1;\npid {self.folder / 'nginx.pid'};\n"
            f"error_log {self.folder / 'error.log'} info;\nevents {{ worker_connections 512; }}\n"
            f"http {{\n    access_log {self.folder / 'access.log'};\n{paths}"
            f"    include {self.folder / 'sip-refuge.conf'};\n}}\n", encoding="utf-8")
        check = subprocess.run(["nginx", "-t", "-p", str(self.folder), "-c", str(self.folder / "nginx.conf")],
                               capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise AssertionError(f"nginx -t refused the recipe:\n{check.stderr}")
        self.proc = subprocess.Popen(["nginx", "-p", str(self.folder), "-c", str(self.folder / "nginx.conf"),
                                      "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"nginx did not start:\n{self.log()}") from None
                time.sleep(0.1)

    def log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM: nginx's fast shutdown, workers included
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
