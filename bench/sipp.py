"""SIPp (Debian's ``sip-tester``) as the scale bench's load generator: scenarios, injection files, processes.

Three kinds of SIPp process, each on its own UDP socket:

- **posts** (and **desks**): one process registers every id of its injection file from its one socket, so
  Asterisk holds one contact per post, all at that address, and qualifies each with OPTIONS; SIPp answers
  requests that belong to no call of its own with its out-of-call scenario (``-oocsf``). The registering
  "calls" then wait (a long pause), so the process lives until the bench stops it.
- the desks' out-of-call scenario answers OPTIONS, and answers an INVITE at once (200 with SDP), then waits
  for Asterisk's ACK and BYE. Ringall makes Asterisk ring every free desk; the first 200 wins and the
  others get ACK then BYE, or a CANCEL that crossed their 200.
- **callers**: post ids dialling the queue extension (INVITE, digest challenge, INVITE with credentials),
  waiting in the queue until a desk answers, talking ``talk_ms``, then hanging up (BYE). A re-INVITE while
  talking (Asterisk's connected-line update once a desk answers) is answered, and the caller then hangs up.

Injection files name each id and its SIP secret; they are written 0600 into the bench's own folder and
removed with it. Nothing here parses SIPp's screens: each process writes its statistics file (``-trace_stat``)
and its error log, which :meth:`Sipp.stats` reads.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

SIPP = "sipp"

REGISTER = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="refuge register">
  <send retrans="500"><![CDATA[
REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:[field0]@[remote_ip]:[remote_port]>;tag=[pid]SIPpTag[call_number]
To: <sip:[field0]@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 REGISTER
Contact: <sip:[field0]@[local_ip]:[local_port]>
Max-Forwards: 70
Expires: 3600
Content-Length: 0

]]></send>
  <recv response="401" auth="true"/>
  <send retrans="500"><![CDATA[
REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:[field0]@[remote_ip]:[remote_port]>;tag=[pid]SIPpTag[call_number]
To: <sip:[field0]@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 2 REGISTER
Contact: <sip:[field0]@[local_ip]:[local_port]>
[field1]
Max-Forwards: 70
Expires: 3600
Content-Length: 0

]]></send>
  <recv response="200"/>
  <!-- Stay: the process must live on to answer Asterisk's qualify OPTIONS (out-of-call scenario). -->
  <pause milliseconds="36000000"/>
</scenario>
"""

OPTIONS_OK = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="refuge post: answer OPTIONS">
  <recv request="OPTIONS"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:];tag=[pid]SIPpTag[call_number]
[last_Call-ID:]
[last_CSeq:]
Contact: <sip:[local_ip]:[local_port]>
Content-Length: 0

]]></send>
</scenario>
"""

DESK = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="refuge desk: answer OPTIONS and INVITE">
  <recv request="INVITE" optional="true" next="invite"/>
  <recv request="OPTIONS"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:];tag=[pid]SIPpTag[call_number]
[last_Call-ID:]
[last_CSeq:]
Contact: <sip:[local_ip]:[local_port]>
Content-Length: 0

]]></send>
  <nop next="end"/>
  <label id="invite"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:];tag=[pid]SIPpTag[call_number]
[last_Call-ID:]
[last_CSeq:]
[last_Record-Route:]
Contact: <sip:[local_ip]:[local_port]>
Content-Type: application/sdp
Content-Length: [len]

v=0
o=desk 1 1 IN IP4 [local_ip]
s=-
c=IN IP4 [local_ip]
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000

]]></send>
  <label id="wait"/>
  <recv request="CANCEL" optional="true" next="cancel"/>
  <recv request="ACK"/>
  <recv request="BYE" timeout="600000"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

]]></send>
  <nop next="end"/>
  <label id="cancel"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

]]></send>
  <nop next="wait"/>
  <label id="end"/>
</scenario>
"""

CALLER = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="refuge post: alarm call">
  <send retrans="500"><![CDATA[
INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:[field0]@[remote_ip]:[remote_port]>;tag=[pid]SIPpTag[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 INVITE
Contact: <sip:[field0]@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Type: application/sdp
Content-Length: [len]

v=0
o=post 1 1 IN IP4 [local_ip]
s=-
c=IN IP4 [local_ip]
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000

]]></send>
  <recv response="100" optional="true"/>
  <recv response="401" auth="true"/>
  <send><![CDATA[
ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:[field0]@[remote_ip]:[remote_port]>;tag=[pid]SIPpTag[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
Call-ID: [call_id]
CSeq: 1 ACK
Max-Forwards: 70
Content-Length: 0

]]></send>
  <send retrans="500"><![CDATA[
INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:[field0]@[remote_ip]:[remote_port]>;tag=[pid]SIPpTag[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 2 INVITE
Contact: <sip:[field0]@[local_ip]:[local_port]>
[field1]
Max-Forwards: 70
Content-Type: application/sdp
Content-Length: [len]

v=0
o=post 1 2 IN IP4 [local_ip]
s=-
c=IN IP4 [local_ip]
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000

]]></send>
  <recv response="100" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="200" rrs="true" timeout="600000"/>
  <send><![CDATA[
ACK [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:[field0]@[remote_ip]:[remote_port]>;tag=[pid]SIPpTag[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
[routes]
Call-ID: [call_id]
CSeq: 2 ACK
Max-Forwards: 70
Content-Length: 0

]]></send>
  <!-- Talk. Asterisk may re-INVITE meanwhile (the connected line: which desk answered, send_connected_line):
       answer it as a phone does, then hang up; a plain pause would abort the call on that INVITE. -->
  <recv request="INVITE" timeout="{talk_ms}" ontimeout="bye"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Contact: <sip:[field0]@[local_ip]:[local_port]>
Content-Type: application/sdp
Content-Length: [len]

v=0
o=post 1 3 IN IP4 [local_ip]
s=-
c=IN IP4 [local_ip]
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000

]]></send>
  <recv request="ACK"/>
  <label id="bye"/>
  <send retrans="500"><![CDATA[
BYE [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:[field0]@[remote_ip]:[remote_port]>;tag=[pid]SIPpTag[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
[routes]
Call-ID: [call_id]
CSeq: 3 BYE
Max-Forwards: 70
Content-Length: 0

]]></send>
  <recv response="200"/>
</scenario>
"""


def write_injection(path: Path, rows: Sequence[tuple[str, str]]) -> Path:
    """SIPp's injection file: ``SEQUENTIAL``, then per line the id and its digest credentials (0600: it holds
    SIP secrets). The credentials go in whole, as SIPp's own ``[authentication ...]`` keyword: SIPp 3.6 does not
    expand ``[field1]`` inside that keyword, but it does read the keyword out of an injected field."""
    path.touch(mode=0o600)
    path.write_text("SEQUENTIAL\n" + "".join(f"{a};[authentication username={a} password={b}]\n" for a, b in rows),
                    encoding="utf-8")
    return path


class Sipp:
    """One SIPp process in the background (no screen), with its statistics and error files in ``folder``."""

    def __init__(self, name: str, folder: Path, scenario: str, target: tuple[str, int], *,
                 injection: Path, calls: int, rate: float, ooc: str | None = None, service: str | None = None,
                 rate_period_ms: int = 1000, local_ip: str = "127.0.0.1") -> None:
        self.name, self.folder = name, folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.xml").write_text(scenario, encoding="utf-8")
        argv = [SIPP, f"{target[0]}:{target[1]}", "-sf", str(folder / f"{name}.xml"), "-inf", str(injection),
                "-i", local_ip, "-p", "0", "-mi", local_ip, "-t", "u1", "-m", str(calls), "-l", str(calls),
                "-r", f"{rate:g}", "-rp", str(rate_period_ms), "-bg", "-nostdin", "-max_recv_loops", "10000",
                "-trace_stat", "-stf", str(folder / f"{name}.stat.csv"), "-fd", "1",
                "-trace_err", "-error_file", str(folder / f"{name}.errors.log"),
                "-timeout_error", "-default_behaviors", "all,-bye"]
        if ooc is not None:
            (folder / f"{name}.ooc.xml").write_text(ooc, encoding="utf-8")
            argv += ["-oocsf", str(folder / f"{name}.ooc.xml")]
        if service is not None:
            argv += ["-s", service]
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sipp:
        # -bg forks: the parent exits at once and prints the child's pid, which is the process we stop later.
        done = subprocess.run(self.argv, capture_output=True, text=True, timeout=30, check=False,
                              cwd=self.folder)
        pid = next((int(w) for w in (done.stdout + done.stderr).replace("[", " ").replace("]", " ").split()
                    if w.isdigit()), None)
        if pid is None:  # the parent of -bg exits 99 once the child runs
            raise RuntimeError(f"sipp {self.name} did not start (exit {done.returncode}): "
                               f"{(done.stdout + done.stderr).strip()[-2000:]}")
        self.pid = pid
        return self

    @property
    def running(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return True

    def stats(self) -> dict[str, str]:
        """The last row of SIPp's statistics file (cumulative counters: ``SuccessfulCall(C)``, ...)."""
        path = self.folder / f"{self.name}.stat.csv"
        try:
            rows = list(csv.reader(path.read_text(encoding="utf-8", errors="replace").splitlines(), delimiter=";"))
        except FileNotFoundError:
            return {}
        if len(rows) < 2:
            return {}
        return dict(zip(rows[0], rows[-1], strict=False))

    def count(self, column: str) -> int:
        value = self.stats().get(column, "0").strip()
        return int(value) if value.isdigit() else 0

    def errors(self, lines: int = 20) -> str:
        try:
            text = (self.folder / f"{self.name}.errors.log").read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.2)
        return not self.running

    def stop(self) -> None:
        """SIGUSR1 makes SIPp dump its statistics and quit; SIGKILL if it lingers."""
        if not self.running:
            return
        for sig, grace in ((signal.SIGUSR1, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return
            if self.wait(grace):
                return

    def __enter__(self) -> Sipp:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
