"""A bare SIP client for bench/speech.py: pjsua2 on the null device with a mock card (no post logic at all).

    python bench/speech_client.py SITE --user desk-1 (--call EXT | --answer) --codec PCMU/8000 \\
        --audio-in IN.wav --audio-out OUT.wav --seconds 20

It registers as ``--user`` (a desk of the site), places or answers one call with only ``--codec`` offered,
connects the call to a :class:`~sip_refuge.post.sip.pjsua2_audio.CardPort` on a
:class:`~sip_refuge.post.sound.MockCard` without an echo path (a headset), lets the call run ``--seconds``
after it is answered, hangs up and exits. It prints one JSON line per event (``registered``, ``answered``,
``ended``) with ``time.monotonic()``. One process per client: pjsua2 allows one library per process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sip_refuge.config import load_site  # noqa: E402
from sip_refuge.post.sip import pjsua2_api as api  # noqa: E402
from sip_refuge.post.sip.pjsua2_api import MediaSettings, pj  # noqa: E402
from sip_refuge.post.sip.pjsua2_audio import BRIDGE_RATE, CardPort, _format  # noqa: E402
from sip_refuge.post.sound import MockCard  # noqa: E402


def say(event: str, **detail: Any) -> None:
    print(json.dumps({"event": event, "at": time.monotonic(), **detail}), flush=True)


class Call(pj.Call):  # type: ignore[misc]
    def __init__(self, account: Any, call_id: int = -1) -> None:
        super().__init__(account, call_id)
        self.state = 0
        self.media_ready = False

    def onCallState(self, prm: Any) -> None:  # noqa: N802
        info = self.getInfo()
        self.state = int(info.state)

    def onCallMediaState(self, prm: Any) -> None:  # noqa: N802
        self.media_ready = True


class Account(pj.Account):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.registered = False
        self.incoming: Call | None = None

    def onRegState(self, prm: Any) -> None:  # noqa: N802
        self.registered = int(prm.code) // 100 == 2 and int(prm.expiration) > 0

    def onIncomingCall(self, prm: Any) -> None:  # noqa: N802
        call = Call(self, int(prm.callId))
        self.incoming = call
        call.answer(api.call_op(200))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("site")
    parser.add_argument("--user", required=True)
    parser.add_argument("--call")
    parser.add_argument("--answer", action="store_true")
    parser.add_argument("--codec", required=True)
    parser.add_argument("--audio-in", required=True)
    parser.add_argument("--audio-out", required=True)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    site = load_site(args.site)
    desk = site.desk(args.user)
    media = MediaSettings(codecs=(args.codec,))
    ep = pj.Endpoint()
    ep.libCreate()
    ep.libInit(api.endpoint_config(media, "", 0))
    api.codec_priorities(ep, media)
    ep.audDevManager().setNullDev()
    card = MockCard(Path(args.audio_in), Path(args.audio_out), BRIDGE_RATE, echo_gain=0.0)
    port = CardPort(card, None)
    port.createPort("card", _format(BRIDGE_RATE))
    transport = ep.transportCreate(api.TRANSPORTS["udp"], api.transport_config(0, "127.0.0.1"))
    ep.libStart()
    account = Account()
    account.create(api.account_config(desk, site.pbx, desk.secret.read(), transport, expiry=120, refresh_every=60,
                                      retry_interval=5), True)
    deadline = time.monotonic() + 15

    def turn(until: float, done: Any = lambda: False) -> bool:
        while time.monotonic() < until:
            ep.libHandleEvents(10)
            if done():
                return True
        return False

    if not turn(deadline, lambda: account.registered):
        raise SystemExit("not registered")
    say("registered")
    placed: list[Call] = []
    if args.call:
        placed.append(Call(account))
        placed[0].makeCall(f"sip:{args.call}@{site.pbx.host}:{site.pbx.sip_port}", api.call_op())

    def current() -> Call | None:
        return placed[0] if placed else account.incoming

    def up() -> bool:
        c = current()
        return c is not None and c.state == api.INV_CONFIRMED and c.media_ready

    if not turn(time.monotonic() + 60, up):
        raise SystemExit("no call")
    call = current()
    assert call is not None
    stream = api.call_audio(call)
    stream.startTransmit(port)
    port.startTransmit(stream)
    say("answered", codec=api.codec_of(call))

    def over() -> bool:
        return call is not None and call.state == api.INV_DISCONNECTED

    turn(time.monotonic() + args.seconds, over)
    if not over():
        call.hangup(api.call_op())
        turn(time.monotonic() + 3, over)
    port.closed = True
    card.close()
    say("ended")
    stream = call = None  # every pjsua2 Call and stream gone before libDestroy (else pjsua asserts)
    placed.clear()
    account.incoming = None
    account.shutdown()
    ep.libDestroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
