"""The machine's self-test room.

**The self-test** (as 2N, Commend and Zenitel do it) has two checks, each judged by :func:`speech.match` on what
the backend recorded (:class:`~sip_refuge.post.commands.CheckAudio`, :class:`~sip_refuge.post.events.AudioHeard`):

* ``pbx``: a call to the PBX's echo extension; a chirp sent into the call must come back (network, PBX, media).
  A call that fails, is not answered or drops counts as this part failing.
* ``local``: the chirp played on the post's own speaker must reach its microphone (speaker, microphone, wiring).
  It runs after the first, with or without the call, so a dead PBX does not hide a dead speaker.

The result names the failed part (``last_self_test.part``): ``local`` or ``pbx``. When both fail it says ``local``,
since only this post's own self-test can show a dead speaker or microphone, while a dead PBX shows everywhere
(registrations, every post's self-test); the detail names both.
"""

from __future__ import annotations

from sip_refuge.post import speech
from sip_refuge.post.commands import CheckAudio, Hangup, StopPrompts
from sip_refuge.post.machine.base import MachineBase
from sip_refuge.post.machine.rules import SelfTestRun, Settings, State, pick_host


def judge_chirp(path: str, rate: int, pcm: bytes, settings: Settings) -> tuple[str, str]:
    """The verdict on one check's recording: ("", what was heard) when the chirp came back, else (what failed, "")."""
    if not rate:
        return "the post could not play and record the chirp", ""
    found = speech.match(speech.test_signal(rate), speech.samples(pcm), rate, segment=speech.CHECK_SEGMENT) \
        if pcm else None
    s = settings
    if found is not None and found.correlation >= s.check_correlation and found.gain_db >= s.check_gain_db:
        return "", f"{'pbx' if path == 'call' else path}: chirp heard ({found.describe()})"
    what = "the echo extension returned no chirp" if path == "call" else "the microphone did not hear the speaker"
    return f"{what} ({found.describe() if found else 'no audio came back'})", ""


class SelfTesting(MachineBase):
    """Runs the two checks in turn and reports the result; a press or a call-back aborts it."""

    def _start_self_test(self, now: float) -> None:
        self._test = SelfTestRun(now)
        self._emit(StopPrompts())
        self._dial("selftest", self.site.self_test.extension, pick_host(self._hosts, self._reach, 0), now,
                   self.settings.self_test_timeout)
        assert self._call is not None
        self._test.call_id = self._call.id
        self._set_state(State.SELFTEST, now, "self-test due")

    def _check(self, path: str, call_id: str | None, now: float) -> None:
        test = self._test
        assert test is not None
        s = self.settings
        test.check = f"{test.call_id or self.post.id}-{path}"
        test.check_path = path
        test.check_deadline = now + s.check_seconds + s.check_grace
        self._emit(CheckAudio(test.check, path, call_id, s.check_seconds))

    def _on_heard(self, check_id: str, rate: int, pcm: bytes, now: float) -> None:
        test = self._test
        if test is None or test.check != check_id:
            return  # the check of an aborted test, or a late one: nobody waits for it
        failure, heard = judge_chirp(test.check_path, rate, pcm, self.settings)
        if heard:
            test.heard.append(heard)
        self._check_done(test.check_path, failure, now)

    def _check_done(self, path: str, failure: str, now: float) -> None:
        test = self._test
        assert test is not None
        test.check, test.check_deadline = None, None
        if path == "call":
            call = self._call
            if call is not None and call.target == "selftest":
                self._emit(Hangup(call.id, "self-test: echo checked"))
                self._call = None
            test.pbx = failure
            self._check("local", None, now)
        else:
            test.local = failure
            self._self_test_done(now)

    def _pbx_failed(self, now: float, reason: str, *, hangup: bool) -> None:
        """The echo call could not be made or kept: the pbx part failed; the local check still runs."""
        test, call = self._test, self._call
        if call is not None and call.target == "selftest":
            if hangup:
                self._emit(Hangup(call.id, reason))
            self._call = None
        if test is None or test.pbx is not None:
            return
        test.pbx = reason
        test.check, test.check_deadline = None, None
        self._check("local", None, now)

    def _abort_self_test(self, now: float) -> None:
        call, test = self._call, self._test
        self._test = None
        if call is not None and call.target == "selftest":
            self._emit(Hangup(call.id, "self-test aborted"))
            self._call = None
        self._self_test_due = now + self.settings.self_test_retry
        self._report("selftest", now, result="aborted", call=test.call_id if test else None)

    def _self_test_done(self, now: float) -> None:
        test = self._test
        assert test is not None
        self._test = None
        failed = [part for part, why in (("local", test.local), ("pbx", test.pbx)) if why]
        passed = not failed
        part = "" if passed else failed[0]  # local first: see the module's docstring
        detail = "; ".join([f"{p}: {why}" for p, why in (("pbx", test.pbx), ("local", test.local)) if why]
                           + ([] if failed else test.heard)) or "passed"
        self.last_self_test = {"at": now, "passed": passed, "detail": detail, "part": part}
        self._report("selftest", now, result="pass" if passed else "fail", detail=detail, part=part,
                     call=test.call_id)
        if passed:
            self._clear_fault("selftest_failed", now)
            self._self_test_due = now + self.site.self_test.interval
        else:
            self._raise_fault("selftest_failed", now, f"{part}: {detail}")
            self._self_test_due = now + self.settings.self_test_retry
        if self._call is None:
            self._set_state(self._rest_state(now), now, "self-test " + ("passed" if passed else f"failed ({part})"))
