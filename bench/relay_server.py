"""A pure relay between Twilio Media Streams and a realtime model: the CPU baseline of
`bench/load.py`.

It does what Twilio's own sample (speech-assistant-openai-realtime-api-python, with OpenAI's
`audio/pcmu`) does and nothing more: no transcoding, no 20 ms framing, no marks, no signature
checks, no call state. Each Twilio `media` payload is forwarded as is in an
`input_audio_buffer.append`; each model `response.audio.delta` goes back as one `media` message
(base64 decoded and encoded again, as the sample does). The model is asked for the persona's
greeting on connect, as the sample asks for its first words.

The fake model speaks pcm16 at 24 kHz only. To hand Twilio the payload sizes a μ-law model would
send (8 bytes per ms), the relay keeps one byte in six of each delta (the last byte of every
group of six in the model's stream, so that the model's first 6·n bytes give exactly n bytes).
The result is noise to a listener and costs a bytes slice; the byte counts, the message counts
and the timing are those of a μ-law relay, and the model side carries the very deltas
phoneagent receives.

With `--pcm16` it is the least a relay must do for StepFun, which takes and gives pcm16 at
24 kHz only (its session reference: "当前仅支持 pcm16"): μ-law ⇄ pcm16 and 8 ⇄ 24 kHz with
`audioop` (C, linear interpolation, no anti-alias filter: the cheapest conversion, not a good
one), so the model side carries real pcm16 24 kHz, as phoneagent's does.

    python bench/relay_server.py --port 8090 --model-url ws://127.0.0.1:PORT/v1/realtime \
        --greeting "Thank you for calling." [--pcm16]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import warnings
from xml.sax.saxutils import quoteattr

from aiohttp import WSMsgType, web
from websockets.asyncio.client import connect

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # leaves the standard library in 3.13
    import audioop

MODEL = "stepaudio-2.5-realtime"
PCM_BYTES_PER_ULAW_BYTE = 6  # pcm16 24 kHz: 48 bytes per ms; μ-law 8 kHz: 8
SESSIONS = web.AppKey("sessions", dict)  # CallSid → model session id, for the benchmark
CONFIG = web.AppKey("config", argparse.Namespace)


async def voice(request: web.Request) -> web.Response:
    url = f"ws://{request.host}/twilio/stream"
    twiml = f"<Response><Connect><Stream url={quoteattr(url)} /></Connect></Response>"
    return web.Response(text=twiml, content_type="text/xml")


async def session_of(request: web.Request) -> web.Response:
    """Which model session served a call (the benchmark matches both ends with it)."""
    session_id = request.app[SESSIONS].get(request.match_info["call_sid"])
    if session_id is None:
        return web.json_response({"error": "unknown call"}, status=404)
    return web.json_response({"model_session": session_id})


async def stream(request: web.Request) -> web.WebSocketResponse:
    config = request.app[CONFIG]
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    start = None
    async for message in ws:
        data = json.loads(message.data)
        if data.get("event") == "start":
            start = data["start"]
            break
    if start is None:
        return ws
    stream_sid = start["streamSid"]
    headers = {"Authorization": "Bearer relay"}
    url = f"{config.model_url}?model={MODEL}"
    async with connect(url, additional_headers=headers, compression=None, max_size=2**23) as model:
        created = json.loads(await model.recv())
        request.app[SESSIONS][start["callSid"]] = created["session"]["id"]
        session = {
            "modalities": ["text", "audio"],
            "instructions": "You are a helpful assistant on a phone call.",
            "voice": "linjiajiejie",
            "input_audio_format": "pcm16",  # the fake model knows no other format
            "output_audio_format": "pcm16",
            "turn_detection": {"type": "server_vad"},
        }
        await model.send(json.dumps({"type": "session.update", "session": session}))
        greet = f'Greet the caller. Say exactly this, and nothing else: "{config.greeting}"'
        create = {"type": "response.create", "response": {"instructions": greet}}
        await model.send(json.dumps(create))

        async def twilio_to_model() -> None:
            state = None  # ratecv's
            async for message in ws:
                if message.type is not WSMsgType.TEXT:
                    continue
                data = json.loads(message.data)
                if data["event"] == "media":
                    append = {"type": "input_audio_buffer.append"}
                    payload = data["media"]["payload"]
                    if config.pcm16:
                        pcm = audioop.ulaw2lin(base64.b64decode(payload), 2)
                        # ratecv holds back 2 samples at the start: put them in front, so that
                        # every frame gives exactly 3 samples per input sample (the bench
                        # matches audio by position).
                        primed = state is not None
                        pcm, state = audioop.ratecv(pcm, 2, 1, 8000, 24000, state)
                        payload = base64.b64encode(pcm if primed else bytes(4) + pcm).decode()
                    append["audio"] = payload
                    await model.send(json.dumps(append))
                elif data["event"] == "stop":
                    return

        async def model_to_twilio() -> None:
            position = 0  # bytes of model audio so far
            state = None  # ratecv's
            async for message in model:
                event = json.loads(message)
                if event["type"] != "response.audio.delta":
                    continue
                pcm = base64.b64decode(event["delta"])
                if config.pcm16:
                    # ratecv gives its first output at once (ceil, not floor, of a third of
                    # the input): that sample is dropped, so no frame runs ahead of the model.
                    primed = state is not None
                    pcm, state = audioop.ratecv(pcm, 2, 1, 24000, 8000, state)
                    ulaw = audioop.lin2ulaw(pcm if primed else pcm[2:], 2)
                else:
                    first = (PCM_BYTES_PER_ULAW_BYTE - 1 - position) % PCM_BYTES_PER_ULAW_BYTE
                    position += len(pcm)
                    ulaw = pcm[first::PCM_BYTES_PER_ULAW_BYTE]
                payload = base64.b64encode(ulaw).decode()
                media = {"event": "media", "streamSid": stream_sid, "media": {"payload": payload}}
                await ws.send_str(json.dumps(media))

        pumps = [asyncio.create_task(twilio_to_model()), asyncio.create_task(model_to_twilio())]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        for pump in pumps:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
    await ws.close()
    return ws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-url", required=True, help="the realtime model's ws:// URL")
    parser.add_argument("--greeting", required=True, help="what the model is asked to say")
    parser.add_argument("--pcm16", action="store_true", help="convert to and from pcm16 24 kHz")
    args = parser.parse_args()
    app = web.Application()
    app[CONFIG] = args
    app[SESSIONS] = {}
    app.router.add_post("/twilio/voice", voice)
    app.router.add_get("/twilio/stream", stream)
    app.router.add_get("/sessions/{call_sid}", session_of)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
