"""WAV files for the test kit: what the caller plays and what it heard, as 8 kHz μ-law."""

from __future__ import annotations

import warnings
import wave
from dataclasses import dataclass
from pathlib import Path

with warnings.catch_warnings():
    # audioop is deprecated in 3.11-3.12 and gone in 3.13, where audioop-lts provides the same
    # module name (DESIGN.md, Conventions). The warning is noise for a test kit.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


__all__ = [
    "CALLER_BOOKING_WAV",
    "CALLER_BOOKING_ZH_WAV",
    "CALLER_RECORDINGS",
    "CallerRecording",
    "caller_recording",
    "read_wav_mulaw",
    "write_mulaw_wav",
]

#: The bundled recording of a caller asking to book a cleaning (see ``assets/README.md``).
CALLER_BOOKING_WAV = Path(__file__).with_name("assets") / "caller_booking.wav"
#: The same request in Mandarin, asking for a doctor of the Mandarin example persona.
CALLER_BOOKING_ZH_WAV = Path(__file__).with_name("assets") / "caller_booking_zh.wav"


@dataclass(frozen=True)
class CallerRecording:
    wav: Path
    text: str  # what it says (the fake model cannot recognise speech: it is told)


#: The bundled caller recordings by language (a tag's first part), from ``assets/README.md``.
CALLER_RECORDINGS = {
    "en": CallerRecording(
        CALLER_BOOKING_WAV, "Hi, I'd like to book a cleaning for next Tuesday morning, please."
    ),
    "zh": CallerRecording(CALLER_BOOKING_ZH_WAV, "你好，我想预约下周二上午看王医生。"),
}


def caller_recording(language: str) -> CallerRecording:
    """The bundled recording in ``language`` (a tag such as "zh-CN"), English if there is none."""
    return CALLER_RECORDINGS.get(language.split("-")[0].lower(), CALLER_RECORDINGS["en"])


def read_wav_mulaw(path: str | Path) -> bytes:
    """Read an 8 kHz 16-bit mono WAV file and return it as μ-law bytes (what Twilio streams)."""
    with wave.open(str(path), "rb") as wav:
        rate, width, channels = wav.getframerate(), wav.getsampwidth(), wav.getnchannels()
        if (rate, width, channels) != (8000, 2, 1):
            raise ValueError(
                f"{path}: {rate} Hz, {8 * width}-bit, {channels} channel(s); the caller plays "
                "8000 Hz 16-bit mono WAV only (convert: sox IN.wav -r 8000 -c 1 -b 16 OUT.wav)"
            )
        return audioop.lin2ulaw(wav.readframes(wav.getnframes()), 2)


def write_mulaw_wav(path: str | Path, mulaw: bytes) -> None:
    """Write μ-law bytes as an 8 kHz 16-bit mono WAV file (playable anywhere)."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(audioop.ulaw2lin(mulaw, 2))
