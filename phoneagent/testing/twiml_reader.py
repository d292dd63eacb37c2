"""Reading a voice webhook's answer the way Twilio reads it (§1.2, §1.3 of
``shared/reference/twilio-media-streams.md``): the verbs, the ``<Connect><Stream>`` and its
``<Parameter>``s, and every problem Twilio would log, with its error code.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

__all__ = ["TwimlAnswer", "TwimlProblem", "parse_twiml_answer"]

TWIML_MAX_BYTES = 64 * 1024  # §1.2, error 11750
PARAMETER_MAX_CHARS = 500  # name + value of one <Parameter> (§1.3)


@dataclass(frozen=True)
class TwimlProblem:
    """Something Twilio would reject or log about a webhook answer, with its error code."""

    code: int | None
    message: str


@dataclass
class TwimlAnswer:
    """What the server answered to the voice webhook, read the way Twilio reads it."""

    status: int
    content_type: str | None
    body: str
    verbs: list[str] = field(default_factory=list)
    stream_url: str | None = None
    stream_attributes: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, str] = field(default_factory=dict)
    connect_action: str | None = None
    says: list[str] = field(default_factory=list)
    say_attributes: list[dict[str, str]] = field(default_factory=list)  # each <Say>'s voice, …
    dials: list[str] = field(default_factory=list)  # the numbers (or clients, SIP URIs) dialled
    hangup: bool = False
    problems: list[TwimlProblem] = field(default_factory=list)

    @property
    def status_callback(self) -> str | None:
        return self.stream_attributes.get("statusCallback")

    @property
    def ok(self) -> bool:
        """True when Twilio would run this TwiML without logging an error."""
        return not self.problems

    @property
    def keeps_call(self) -> bool:
        """True when running this TwiML leaves the call up: it hands the caller on (``<Dial>``,
        ``<Redirect>``) or opens another stream. Otherwise the call ends once it has run."""
        return bool({"Dial", "Redirect", "Connect", "Enqueue"} & set(self.verbs))


def parse_twiml_answer(
    status: int, content_type: str | None, body: str, *, request_url: str
) -> TwimlAnswer:
    """Read a voice-webhook HTTP answer as Twilio does; problems carry Twilio's error codes."""
    answer = TwimlAnswer(status=status, content_type=content_type, body=body)
    problems = answer.problems
    if status >= 400:
        problems.append(TwimlProblem(11200, f"HTTP {status} from the webhook"))
        return answer
    mime = (content_type or "").split(";")[0].strip().lower()
    if mime not in ("text/xml", "application/xml"):
        problems.append(TwimlProblem(12300, f"invalid Content-Type {content_type!r}"))
    if len(body.encode()) > TWIML_MAX_BYTES:
        problems.append(TwimlProblem(11750, "TwiML body larger than 64 kB"))
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:  # includes anything before <?xml …?> (§1.2)
        problems.append(TwimlProblem(12100, f"TwiML does not parse: {exc}"))
        return answer
    if root.tag != "Response":
        problems.append(TwimlProblem(12100, f"root element is <{root.tag}>, not <Response>"))
        return answer
    for verb in root:
        answer.verbs.append(verb.tag)
        if verb.tag == "Say":
            answer.says.append((verb.text or "").strip())
            answer.say_attributes.append(dict(verb.attrib))
        elif verb.tag == "Hangup":
            answer.hangup = True
        elif verb.tag == "Dial":
            answer.dials.append("".join(verb.itertext()).strip())
        elif verb.tag == "Connect":
            answer.connect_action = verb.get("action")
            for stream in verb.iter("Stream"):
                _read_stream(answer, stream, request_url)
    return answer


def _read_stream(answer: TwimlAnswer, stream: ET.Element, request_url: str) -> None:
    url = stream.get("url")
    if not url:
        answer.problems.append(TwimlProblem(31923, "<Stream> without url"))
        return
    # A relative url is resolved against the webhook URL; Twilio then needs wss (§1.3, 31922).
    absolute = urljoin(request_url, url)
    if absolute.startswith("https://"):
        absolute = "wss://" + absolute[len("https://") :]
    elif absolute.startswith("http://"):
        absolute = "ws://" + absolute[len("http://") :]
    scheme = urlsplit(absolute).scheme
    # Loopback tests run on plain http, so ws is accepted only when the webhook itself was http.
    if scheme != "wss" and not (scheme == "ws" and request_url.startswith("http://")):
        answer.problems.append(TwimlProblem(31922, f"stream URL scheme {scheme!r} is not wss"))
    if urlsplit(absolute).query:
        answer.problems.append(TwimlProblem(None, "stream URL has a query string (§1.3)"))
    track = stream.get("track", "inbound_track")
    if track != "inbound_track":
        answer.problems.append(TwimlProblem(31941, f"track {track!r} with <Connect>"))
    answer.stream_url = absolute
    answer.stream_attributes = dict(stream.attrib)
    for parameter in stream.iter("Parameter"):
        name, value = parameter.get("name", ""), parameter.get("value", "")
        if len(name) + len(value) >= PARAMETER_MAX_CHARS:
            answer.problems.append(TwimlProblem(None, f"<Parameter {name}> is 500+ characters"))
        answer.parameters[name] = value
