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

# Each SIP message shape is written once below and the scenarios compose them. The words in brackets are SIPp's
# keywords, filled in per call: [field0] is the post's id and [field1] its digest credentials (injection file).
POST_URI = "sip:[field0]@[remote_ip]:[remote_port]"
QUEUE_URI = "sip:[service]@[remote_ip]:[remote_port]"
OUR_TAG = ";tag=[pid]SIPpTag[call_number]"


def sdp(owner: str, version: int) -> list[str]:
    """One PCMU audio stream at SIPp's media port; ``version`` must grow with each new offer or answer."""
    return ["v=0", f"o={owner} 1 {version} IN IP4 [local_ip]", "s=-", "c=IN IP4 [local_ip]", "t=0 0",
            "m=audio [media_port] RTP/AVP 0", "a=rtpmap:0 PCMU/8000"]


def body(offer: list[str] | None) -> list[str]:
    if offer is None:
        return ["Content-Length: 0"]
    return ["Content-Type: application/sdp", "Content-Length: [len]", "", *offer]


def request(method: str, uri: str, cseq: int, to: str, *, in_dialog: bool = False, routes: bool = False,
            contact: bool = False, auth: bool = False, expires: bool = False,
            offer: list[str] | None = None) -> list[str]:
    """A request from the post ([field0]) to the PBX. ``in_dialog``: To carries the PBX's tag; ``routes``: the
    route set the 200 recorded (``rrs``); ``auth``: the digest credentials answering the PBX's 401."""
    lines = [f"{method} {uri} SIP/2.0", "Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]",
             f"From: <{POST_URI}>{OUR_TAG}", f"To: <{to}>" + ("[peer_tag_param]" if in_dialog else "")]
    lines += ["[routes]"] if routes else []
    lines += ["Call-ID: [call_id]", f"CSeq: {cseq} {method}"]
    lines += ["Contact: <sip:[field0]@[local_ip]:[local_port]>"] if contact else []
    lines += ["[field1]"] if auth else []
    lines += ["Max-Forwards: 70"]
    lines += ["Expires: 3600"] if expires else []
    return lines + body(offer)


def ok(*, tag: bool = False, record_route: bool = False, contact: str | None = None,
       offer: list[str] | None = None) -> list[str]:
    """200 OK to the request just received. ``tag``: ours, for the dialog (or transaction) this answer starts."""
    lines = ["SIP/2.0 200 OK", "[last_Via:]", "[last_From:]", "[last_To:]" + (OUR_TAG if tag else ""),
             "[last_Call-ID:]", "[last_CSeq:]"]
    lines += ["[last_Record-Route:]"] if record_route else []
    lines += [f"Contact: <sip:{contact}>"] if contact is not None else []
    return lines + body(offer)


def send(message: list[str], *, retrans: bool = False) -> str:
    """A ``<send>`` of ``message``; ``retrans``: SIPp re-sends it every 500 ms until answered (UDP)."""
    start = '<send retrans="500">' if retrans else "<send>"
    return start + "<![CDATA[\n" + "\n".join(message) + "\n\n]]></send>"


def scenario(name: str, steps: list[str]) -> str:
    return ('<?xml version="1.0" encoding="ISO-8859-1" ?>\n' + f'<scenario name="{name}">\n'
            + "".join(f"  {step}\n" for step in steps) + "</scenario>\n")


def register(cseq: int, *, auth: bool) -> list[str]:
    return request("REGISTER", "sip:[remote_ip]:[remote_port]", cseq, POST_URI, contact=True, auth=auth,
                   expires=True)


def invite(cseq: int, *, auth: bool) -> list[str]:
    return request("INVITE", QUEUE_URI, cseq, QUEUE_URI, contact=True, auth=auth, offer=sdp("post", cseq))


def in_call(method: str, cseq: int) -> list[str]:
    """ACK to the 200 and BYE: to the answering side's Contact, along the recorded routes."""
    return request(method, "[next_url]", cseq, QUEUE_URI, in_dialog=True, routes=True)


ANSWER_OPTIONS = ['<recv request="OPTIONS"/>', send(ok(tag=True, contact="[local_ip]:[local_port]"))]

REGISTER = scenario("refuge register", [
    send(register(1, auth=False), retrans=True),
    '<recv response="401" auth="true"/>',
    send(register(2, auth=True), retrans=True),
    '<recv response="200"/>',
    "<!-- Stay: the process must live on to answer Asterisk's qualify OPTIONS (out-of-call scenario). -->",
    '<pause milliseconds="36000000"/>',
])

OPTIONS_OK = scenario("refuge post: answer OPTIONS", ANSWER_OPTIONS)

DESK = scenario("refuge desk: answer OPTIONS and INVITE", [
    '<recv request="INVITE" optional="true" next="invite"/>',
    *ANSWER_OPTIONS,
    '<nop next="end"/>',
    '<label id="invite"/>',
    send(ok(tag=True, record_route=True, contact="[local_ip]:[local_port]", offer=sdp("desk", 1))),
    '<label id="wait"/>',
    '<recv request="CANCEL" optional="true" next="cancel"/>',
    '<recv request="ACK"/>',
    '<recv request="BYE" timeout="600000"/>',
    send(ok()),
    '<nop next="end"/>',
    '<label id="cancel"/>',
    send(ok()),
    '<nop next="wait"/>',
    '<label id="end"/>',
])


def caller(talk_ms: int) -> str:
    """The alarm call of one post: challenged INVITE, wait in the queue, talk ``talk_ms`` ms, hang up."""
    return scenario("refuge post: alarm call", [
        send(invite(1, auth=False), retrans=True),
        '<recv response="100" optional="true"/>',
        '<recv response="401" auth="true"/>',
        send(request("ACK", QUEUE_URI, 1, QUEUE_URI, in_dialog=True)),
        send(invite(2, auth=True), retrans=True),
        '<recv response="100" optional="true"/>',
        '<recv response="183" optional="true"/>',
        '<recv response="180" optional="true"/>',
        '<recv response="200" rrs="true" timeout="600000"/>',
        send(in_call("ACK", 2)),
        "<!-- Talk. Asterisk may re-INVITE meanwhile (the connected line: which desk answered, send_connected_line):"
        "\n       answer it as a phone does, then hang up; a plain pause would abort the call on that INVITE. -->",
        f'<recv request="INVITE" timeout="{talk_ms}" ontimeout="bye"/>',
        send(ok(contact="[field0]@[local_ip]:[local_port]", offer=sdp("post", 3))),
        '<recv request="ACK"/>',
        '<label id="bye"/>',
        send(in_call("BYE", 3), retrans=True),
        '<recv response="200"/>',
    ])


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
