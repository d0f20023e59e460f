"""Acoustic echo cancelling with speexdsp (Debian's libspeexdsp1), through a small ctypes binding.

The far end's voice leaves the post's speaker and reaches its microphone a few milliseconds later, louder than
the caller, who stands half a metre away. Without a canceller the operator hears their own voice back
(the first complaint about Raspberry Pi intercoms, see notes/field.md). speexdsp's canceller (an adaptive MDF
filter) learns that path from what the speaker played and subtracts it; its preprocessor then suppresses what is
left. It is the same library pjmedia uses for pjsua2's canceller, so both backends cancel echo the same way.

Noise suppression and AGC are left off: they would reshape the caller's voice, and the desk's own processing
does that better.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

from sip_refuge.errors import RefugeError

SPEEX_ECHO_SET_SAMPLING_RATE = 24
SPEEX_PREPROCESS_SET_DENOISE = 0
SPEEX_PREPROCESS_SET_AGC = 2
SPEEX_PREPROCESS_SET_ECHO_STATE = 24
LIBRARY = "libspeexdsp.so.1"


@cache
def _library() -> ctypes.CDLL | None:
    for name in (LIBRARY, ctypes.util.find_library("speexdsp")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.speex_echo_state_init.restype = ctypes.c_void_p
        lib.speex_echo_state_init.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.speex_echo_ctl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        lib.speex_echo_cancellation.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
        lib.speex_echo_state_destroy.argtypes = [ctypes.c_void_p]
        lib.speex_preprocess_state_init.restype = ctypes.c_void_p
        lib.speex_preprocess_state_init.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.speex_preprocess_ctl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        lib.speex_preprocess_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.speex_preprocess_state_destroy.argtypes = [ctypes.c_void_p]
        return lib
    return None


def available() -> bool:
    """Whether this machine can cancel echo (libspeexdsp is installed)."""
    return _library() is not None


class EchoCanceller:
    """Cancels the speaker's echo in the microphone's frames: ``frame`` samples at ``rate``, ``tail_ms`` of echo."""

    def __init__(self, rate: int, frame: int, tail_ms: int = 200) -> None:
        lib = _library()
        if lib is None:
            raise RefugeError(f"echo cancelling needs {LIBRARY} (Debian package libspeexdsp1)")
        self._lib, self.frame = lib, frame
        self._echo = lib.speex_echo_state_init(frame, rate * tail_ms // 1000)
        self._pre = lib.speex_preprocess_state_init(frame, rate)
        if not self._echo or not self._pre:
            raise RefugeError("speexdsp could not create an echo canceller")
        value = ctypes.c_int(rate)
        lib.speex_echo_ctl(self._echo, SPEEX_ECHO_SET_SAMPLING_RATE, ctypes.byref(value))
        off = ctypes.c_int(0)
        lib.speex_preprocess_ctl(self._pre, SPEEX_PREPROCESS_SET_DENOISE, ctypes.byref(off))
        lib.speex_preprocess_ctl(self._pre, SPEEX_PREPROCESS_SET_AGC, ctypes.byref(off))
        lib.speex_preprocess_ctl(self._pre, SPEEX_PREPROCESS_SET_ECHO_STATE, ctypes.c_void_p(self._echo))
        self._out = ctypes.create_string_buffer(frame * 2)

    def process(self, microphone: bytes, speaker: bytes) -> bytes:
        """The microphone's frame without the echo of ``speaker``, the frame the speaker played at the same time."""
        if len(microphone) != self.frame * 2 or len(speaker) != self.frame * 2:
            raise ValueError(f"frames of {self.frame} samples expected")
        if self._echo is None:
            return microphone
        self._lib.speex_echo_cancellation(self._echo, microphone, speaker, self._out)
        self._lib.speex_preprocess_run(self._pre, self._out)
        return self._out.raw

    def close(self) -> None:
        if self._echo is not None:
            self._lib.speex_preprocess_state_destroy(self._pre)
            self._lib.speex_echo_state_destroy(self._echo)
            self._echo = self._pre = None

    def __del__(self) -> None:
        self.close()
