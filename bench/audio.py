"""Compare phoneagent's resampler with audioop.ratecv and soxr, in one run, as one table.

    python bench/audio.py

Every method runs as a stream fed 20 ms chunks, the way a call feeds it. Quality columns use
float samples on the pcm16 scale (audioop.ratecv only takes int16, so it gets int16); the
µs column times the real path: pcm16 bytes in, pcm16 bytes out.
"""

from __future__ import annotations

import math
import platform
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import soxr

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # stdlib audioop, Python 3.11-3.12
    import audioop

from phoneagent.audio import (
    CallerToModel,
    ModelToCaller,
    Resampler,
    pcm16_to_samples,
    pcm16_view,
    samples_to_pcm16,
)

LOW, HIGH = 8000, 24000
DIRECTIONS = [(LOW, HIGH), (HIGH, LOW)]
AMPLITUDE = 16000.0  # half scale: room for filter overshoot in int16
SETTLE_S = 0.2  # output skipped before measuring: longer than any method's delay
TIMED_FRAMES = 1000

# A stream: feed it the next chunk (float samples, pcm16 scale), get what comes out.
Stream = Callable[[np.ndarray], np.ndarray]
# A byte stream: the next chunk of pcm16 bytes in, pcm16 bytes out.
ByteStream = Callable[[bytes], bytes]


def phoneagent_stream(from_rate: int, to_rate: int) -> Stream:
    return Resampler(from_rate, to_rate).process


def phoneagent_bytes(from_rate: int, to_rate: int) -> ByteStream:
    resampler = Resampler(from_rate, to_rate)
    # As the pipelines do it: int16 straight into the resampler, which converts as it copies.
    return lambda pcm: samples_to_pcm16(resampler.process(pcm16_view(pcm)))


def ratecv_bytes(from_rate: int, to_rate: int) -> ByteStream:
    state = None

    def process(pcm: bytes) -> bytes:
        nonlocal state
        out, state = audioop.ratecv(pcm, 2, 1, from_rate, to_rate, state)
        return out

    return process


def ratecv_stream(from_rate: int, to_rate: int) -> Stream:
    process = ratecv_bytes(from_rate, to_rate)
    return lambda x: pcm16_to_samples(process(samples_to_pcm16(x)))


def soxr_stream(quality: str) -> Callable[[int, int], Stream]:
    def make(from_rate: int, to_rate: int) -> Stream:
        return soxr.ResampleStream(from_rate, to_rate, 1, "float64", quality).resample_chunk

    return make


def soxr_bytes(quality: str) -> Callable[[int, int], ByteStream]:
    def make(from_rate: int, to_rate: int) -> ByteStream:
        stream = soxr.ResampleStream(from_rate, to_rate, 1, "int16", quality)
        return lambda pcm: stream.resample_chunk(np.frombuffer(pcm, np.int16)).tobytes()

    return make


METHODS = [
    ("phoneagent", phoneagent_stream, phoneagent_bytes),
    ("audioop.ratecv", ratecv_stream, ratecv_bytes),
    ("soxr HQ", soxr_stream("HQ"), soxr_bytes("HQ")),
    ("soxr LQ", soxr_stream("LQ"), soxr_bytes("LQ")),
]


def run(make: Callable[[int, int], Stream], from_rate: int, to_rate: int, x: np.ndarray):
    process = make(from_rate, to_rate)
    chunk = from_rate // 50
    return np.concatenate([process(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def tone(freq: float, rate: int, seconds: float = 0.6) -> np.ndarray:
    return AMPLITUDE * np.sin(2 * math.pi * freq * np.arange(round(rate * seconds)) / rate + 0.7)


def fit(y: np.ndarray, freq: float, rate: int) -> tuple[float, float]:
    """Least-squares sine at `freq` on the settled part of y: (amplitude, rms of the rest)."""
    start = round(SETTLE_S * rate)
    t = np.arange(start, len(y)) / rate
    basis = np.column_stack(
        (np.sin(2 * math.pi * freq * t), np.cos(2 * math.pi * freq * t), np.ones_like(t))
    )
    coef, *_ = np.linalg.lstsq(basis, y[start:], rcond=None)
    rest = y[start:] - basis @ coef
    return math.hypot(coef[0], coef[1]), float(np.sqrt(np.mean(rest**2)))


def db(ratio: float) -> float:
    return 20 * math.log10(max(ratio, 1e-12))


def rejection_db(make, from_rate: int, to_rate: int) -> float:
    """Worst case over the tones the budget names (4.4–12 kHz on the 24 kHz side).

    24 → 8: a tone from 4.4 to 12 kHz should vanish; the level of what comes out.
    8 → 24: a tone up to 3.6 kHz should come out alone; the level of everything else (its
    images, at 8 kHz ± f, all within 4.4–12 kHz).
    """
    worst = math.inf
    if from_rate > to_rate:
        for freq in [*range(4400, 12000, 200), 8000, 11999]:
            y = run(make, from_rate, to_rate, tone(freq, from_rate))
            level = np.sqrt(np.mean(y[round(SETTLE_S * to_rate) :] ** 2))
            worst = min(worst, -db(level / (AMPLITUDE / math.sqrt(2))))
    else:
        for freq in range(100, 3601, 100):
            amplitude, rest = fit(
                run(make, from_rate, to_rate, tone(freq, from_rate)), freq, to_rate
            )
            worst = min(worst, -db(rest / (amplitude / math.sqrt(2))))
    return worst


def passband_db(make, from_rate: int, to_rate: int) -> float:
    """Largest gain deviation from 0 dB over 300–3400 Hz."""
    deviations = []
    for freq in range(300, 3401, 100):
        amplitude, _ = fit(run(make, from_rate, to_rate, tone(freq, from_rate)), freq, to_rate)
        deviations.append(abs(db(amplitude / AMPLITUDE)))
    return max(deviations)


def delay_ms(make, from_rate: int, to_rate: int) -> tuple[float, float]:
    """How late the caller hears a sound: the delay of the signal within the output stream
    plus the output a streaming method holds back (soxr emits late rather than shifted).

    The shift: cross-correlation of a multi-tone signal with its ideal output finds the whole
    samples, then a fine search of the same correlation on the analytic signal the fraction.
    The hold-back: output samples owed but not yet emitted after each 20 ms chunk; soxr emits
    in bursts, so it swings from chunk to chunk. Returns (mean, worst), in ms.
    """
    rng = np.random.default_rng(0)
    freqs = rng.uniform(300, 3400, 24)
    phases = rng.uniform(0, 2 * math.pi, 24)

    def signal(t: np.ndarray) -> np.ndarray:
        return (AMPLITUDE / 8) * np.sin(2 * math.pi * np.outer(t, freqs) + phases).sum(axis=1)

    x = signal(np.arange(from_rate) / from_rate)
    process, chunk = make(from_rate, to_rate), from_rate // 50
    parts, owed = [], []
    for i in range(0, len(x), chunk):
        parts.append(process(x[i : i + chunk]))
        emitted = sum(len(part) for part in parts)
        owed.append((i + chunk) * to_rate // from_rate - emitted)
    settled_owed = np.array(owed[len(owed) // 2 :]) / to_rate

    y = np.concatenate(parts)[: to_rate // 2]
    t_out = np.arange(len(y)) / to_rate
    ideal = signal(t_out)
    coarse = [np.dot(y[lag:], ideal[: len(y) - lag]) for lag in range(round(0.2 * to_rate))]
    lag = int(np.argmax(coarse)) / to_rate
    fine = np.linspace(lag - 1 / to_rate, lag + 1 / to_rate, 401)
    shift = fine[int(np.argmax([np.dot(y, signal(t_out - d)) for d in fine]))]
    return (shift + settled_owed.mean()) * 1e3, (shift + settled_owed.max()) * 1e3


def us_per_frame(make_bytes, from_rate: int, to_rate: int) -> float:
    """Best of 5 runs of TIMED_FRAMES frames of noise, bytes in and out, in µs per frame."""
    rng = np.random.default_rng(1)
    frames = [
        rng.normal(0, 3000, from_rate // 50).astype("<i2").tobytes() for _ in range(TIMED_FRAMES)
    ]
    best = math.inf
    for _ in range(5):
        process = make_bytes(from_rate, to_rate)
        start = time.perf_counter()
        for frame in frames:
            process(frame)
        best = min(best, time.perf_counter() - start)
    return best / TIMED_FRAMES * 1e6


def path_and_soxr_us_per_frame(rounds: int = 7) -> tuple[float, float]:
    """The whole audio path of a call per 20 ms, and soxr HQ doing the same resampling.

    The path: μ-law decode + 8 → 24 kHz (CallerToModel) and 24 → 8 kHz + μ-law encode +
    framing (ModelToCaller), one frame each way. soxr HQ: one frame each way on int16 streams,
    no codec. Rounds alternate between the two so both see the same machine (a shared 2-core
    box drifts by tens of percent between seconds); best round of each, in µs per frame.
    """
    rng = np.random.default_rng(2)
    caller = [rng.integers(0, 256, 160, dtype=np.uint8).tobytes() for _ in range(TIMED_FRAMES)]
    model = [rng.normal(0, 3000, 480).astype("<i2").tobytes() for _ in range(TIMED_FRAMES)]
    caller_pcm = [rng.normal(0, 3000, 160).astype("<i2").tobytes() for _ in range(TIMED_FRAMES)]
    path = reference = math.inf
    for _ in range(rounds):
        inbound, outbound = CallerToModel(), ModelToCaller()
        start = time.perf_counter()
        for ulaw, pcm in zip(caller, model, strict=True):
            inbound.process(ulaw)
            outbound.process(pcm)
        path = min(path, time.perf_counter() - start)

        up, down = soxr_bytes("HQ")(LOW, HIGH), soxr_bytes("HQ")(HIGH, LOW)
        start = time.perf_counter()
        for low, pcm in zip(caller_pcm, model, strict=True):
            up(low)
            down(pcm)
        reference = min(reference, time.perf_counter() - start)
    return path / TIMED_FRAMES * 1e6, reference / TIMED_FRAMES * 1e6


def main() -> None:
    print(
        f"# audio resampling, 20 ms chunks — Python {platform.python_version()}, "
        f"numpy {np.__version__}, soxr {soxr.__version__}, {platform.machine()}"
    )
    print("# budget: rejection >= 80 dB, passband within ±0.1 dB, delay <= 5 ms,")
    print("#         codec + both directions per 20 ms frame: <= 30 µs, <= 2× soxr HQ both ways\n")
    header = (
        "| method | direction | rejection 4.4–12 kHz (dB) | passband 300–3400 Hz (±dB) "
        "| delay mean / worst (ms) | µs / 20 ms frame |"
    )
    print(header)
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, make, make_bytes in METHODS:
        for from_rate, to_rate in DIRECTIONS:
            direction = f"{from_rate // 1000} → {to_rate // 1000} kHz"
            mean_delay, worst_delay = delay_ms(make, from_rate, to_rate)
            print(
                f"| {name} | {direction} "
                f"| {rejection_db(make, from_rate, to_rate):.1f} "
                f"| {passband_db(make, from_rate, to_rate):.4f} "
                f"| {mean_delay:.2f} / {worst_delay:.2f} "
                f"| {us_per_frame(make_bytes, from_rate, to_rate):.1f} |",
                flush=True,
            )
    # The same job as a call's audio path, per 20 ms: one frame each way. soxr does not do
    # μ-law; the path's row includes it (and the 20 ms framing), so the ratio is conservative.
    path, soxr_both = path_and_soxr_us_per_frame()
    print(f"| soxr HQ, one frame each way | 8 → 24 + 24 → 8 kHz | | | | {soxr_both:.1f} |")
    print(
        f"| phoneagent CallerToModel + ModelToCaller | both, with μ-law | | | "
        f"| {path:.1f} ({path / soxr_both:.2f}× soxr HQ) |"
    )


if __name__ == "__main__":
    sys.exit(main())
