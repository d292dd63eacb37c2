"""The Pipecat peer of `bench/load.py`: the same job built the way Pipecat's Twilio dial-in
example builds it (pipecat-ai 1.14, `pip install -e '.[bench]'`).

Per call, as in Pipecat's `examples/twilio-chatbot` and its OpenAI realtime examples: a FastAPI
WebSocket endpoint reads Twilio's `connected`/`start` (`parse_telephony_websocket`), then runs
a pipeline `transport.input() → user aggregator → OpenAIRealtimeLLMService → transport.output()
→ assistant aggregator` over `FastAPIWebsocketTransport` with `TwilioFrameSerializer`, at 8 kHz
in and out (`PipelineParams(audio_in_sample_rate=8000, audio_out_sample_rate=8000)`). Audio is
resampled where Pipecat resamples it: the serializer decodes μ-law to 8 kHz pcm16
(`ulaw_to_pcm`), the realtime service resamples to 24 kHz for its appends, and the serializer
resamples the model's 24 kHz audio to 8 kHz and encodes μ-law (`pcm_to_ulaw`), all with
Pipecat's stream resampler (soxr). No local VAD and no STT/TTS: the model's server VAD
decides turns, as in Pipecat's realtime examples.

What had to be adapted to point the OpenAI service at StepFun's dialect (the fake model speaks
it; `StepFunDialect` below, nothing else changed):

- Pipecat speaks OpenAI's GA realtime protocol; StepFun speaks the beta one. `session.update`
  is rewritten to the beta's flat session (`modalities`, `instructions`, `voice`,
  `input_audio_format`/`output_audio_format` `pcm16`, `turn_detection` `server_vad`) and
  `response.create`'s `output_modalities` to `modalities`; every other client event (the
  appends) goes out as Pipecat built it.
- Server events are renamed to the GA names Pipecat dispatches on:
  `response.audio.delta` → `response.output_audio.delta`, `response.audio_transcript.delta`
  → `response.output_audio_transcript.delta`, `response.text.delta` →
  `response.output_text.delta`, `conversation.item.created` → `conversation.item.added`
  (a substring replacement in the message text, before Pipecat's own parsing).
- The model and the voice are StepFun's (`stepaudio-2.5-realtime`, `linjiajiejie`), and the
  greeting is asked for the way StepFun documents it: the session's instructions end with
  `请你原样无修改地输出下面的话：` and the words; Pipecat's `LLMRunFrame` makes the response.
- The Twilio REST hang-up on `EndFrame` (`auto_hang_up`) is off: there is no Twilio here.

The voice webhook answers the TwiML `<Connect><Stream>` to `/ws`, and `/sessions/{CallSid}`
tells the benchmark which model session served a call (from `session.created`).

    python bench/pipecat_server.py --port 8091 --model-url ws://127.0.0.1:PORT/v1/realtime \
        --greeting "Thank you for calling."
"""

from __future__ import annotations

import argparse
import sys
from typing import Any
from xml.sax.saxutils import quoteattr

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from loguru import logger
from pipecat.frames.frames import LLMRunFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)

MODEL = "stepaudio-2.5-realtime"
VOICE = "linjiajiejie"
VERBATIM_PROMPT = "请你原样无修改地输出下面的话："  # StepFun's documented greeting recipe
INSTRUCTIONS = "You are a helpful assistant on a phone call."
RENAMES = (
    ('"response.audio.delta"', '"response.output_audio.delta"'),
    ('"response.audio_transcript.delta"', '"response.output_audio_transcript.delta"'),
    ('"response.text.delta"', '"response.output_text.delta"'),
    ('"conversation.item.created"', '"conversation.item.added"'),
)
SESSIONS: dict[str, str] = {}  # CallSid → model session id, for the benchmark


class _Renamed:
    """The model's socket, its server events renamed to OpenAI's GA names."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)

    def __aiter__(self) -> _Renamed:
        self._messages = aiter(self._ws)
        return self

    async def __anext__(self) -> str:
        message = await anext(self._messages)
        for old, new in RENAMES:
            if old in message:
                return message.replace(old, new, 1)
        return message


class StepFunDialect(OpenAIRealtimeLLMService):
    """Pipecat's OpenAI realtime service, speaking StepFun's (OpenAI beta) dialect."""

    async def _connect(self) -> None:
        await super()._connect()
        if self._websocket is not None and not isinstance(self._websocket, _Renamed):
            self._websocket = _Renamed(self._websocket)

    call_sid = ""

    async def _handle_evt_session_created(self, evt: Any) -> None:
        SESSIONS[self.call_sid] = evt.session.id  # the benchmark's matching, nothing else
        await super()._handle_evt_session_created(evt)

    async def _ws_send(self, realtime_message: dict[str, Any]) -> None:
        kind = realtime_message.get("type")
        if kind == "session.update":
            session = realtime_message.get("session", {})
            realtime_message = {
                "type": "session.update",
                "session": {
                    "modalities": ["text", "audio"],
                    "instructions": session.get("instructions") or INSTRUCTIONS,
                    "voice": VOICE,
                    "input_audio_format": "pcm16",
                    "output_audio_format": "pcm16",
                    "turn_detection": {"type": "server_vad"},
                },
            }
        elif kind == "response.create":
            response = dict(realtime_message.get("response") or {})
            if "output_modalities" in response:
                response.pop("output_modalities")
                response["modalities"] = ["text", "audio"]
            realtime_message = {"type": "response.create", "response": response}
        await super()._ws_send(realtime_message)


def make_app(model_url: str, greeting: str) -> FastAPI:
    app = FastAPI()

    @app.post("/twilio/voice")
    async def voice(request: Request) -> Response:
        url = f"ws://{request.headers['host']}/ws"
        twiml = f"<Response><Connect><Stream url={quoteattr(url)} /></Connect></Response>"
        return Response(content=twiml, media_type="text/xml")

    @app.get("/sessions/{call_sid}")
    async def session_of(call_sid: str) -> JSONResponse:
        session_id = SESSIONS.get(call_sid)
        if session_id is None:
            return JSONResponse({"error": "unknown call"}, status_code=404)
        return JSONResponse({"model_session": session_id})

    @app.websocket("/ws")
    async def stream(websocket: WebSocket) -> None:
        await websocket.accept()
        _, call_data = await parse_telephony_websocket(websocket)
        call_sid = call_data["call_id"]
        serializer = TwilioFrameSerializer(
            stream_sid=call_data["stream_id"],
            call_sid=call_sid,
            params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
        )
        transport = FastAPIWebsocketTransport(
            websocket=websocket,
            params=FastAPIWebsocketParams(
                audio_in_enabled=True,
                audio_out_enabled=True,
                add_wav_header=False,
                serializer=serializer,
            ),
        )
        llm = StepFunDialect(
            api_key="pipecat",
            base_url=model_url,
            settings=StepFunDialect.Settings(
                model=MODEL, system_instruction=f"{INSTRUCTIONS}\n{VERBATIM_PROMPT}{greeting}"
            ),
        )
        context = LLMContext()
        aggregators = LLMContextAggregatorPair(context)
        user, assistant = aggregators.user(), aggregators.assistant()
        pipeline = Pipeline([transport.input(), user, llm, transport.output(), assistant])
        task = PipelineTask(
            pipeline,
            params=PipelineParams(audio_in_sample_rate=8000, audio_out_sample_rate=8000),
        )

        @transport.event_handler("on_client_connected")
        async def on_client_connected(transport: Any, client: Any) -> None:
            await task.queue_frames([LLMRunFrame()])

        @transport.event_handler("on_client_disconnected")
        async def on_client_disconnected(transport: Any, client: Any) -> None:
            await task.cancel()

        llm.call_sid = call_sid
        await PipelineRunner(handle_sigint=False).run(task)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-url", required=True, help="the realtime model's ws:// URL")
    parser.add_argument("--greeting", required=True, help="what the model is asked to say")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    app = make_app(args.model_url, args.greeting)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
