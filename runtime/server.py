"""`moetvm serve`: an OpenAI-compatible HTTP server for one loaded LM artifact, small enough for a
board (tornado, already a runtime dependency; no torch).

  POST /v1/completions        {"prompt": text | token ids, "max_tokens", "temperature", "top_p", "top_k",
                               "repetition_penalty", "seed", "stop", "stream"}
  POST /v1/chat/completions   {"messages": [{"role", "content"}...], the same options}
  GET  /v1/models             the one model
  GET  /health                {"status": "ok"} (no key needed: for load balancers)
  GET  /metrics               Prometheus text: requests, tokens, tokens/s, expert cache hit rate and loads, RSS

`"stream": true` answers with server-sent events (`data: {chunk}` ... `data: [DONE]`), as OpenAI
does. A completion's choices also carry the new `token_ids` (as vLLM can): the whole answer of an
artifact that ships no tokenizer. The model runs on one worker thread: requests queue in arrival order and are served one at
a time (the model and its expert cache are one per process); the event loop keeps accepting,
streaming and answering /health meanwhile. A bad request (malformed JSON, unknown or out-of-range
values, more tokens than the model's positions) gets HTTP 400 with OpenAI's error object; a
wrong or missing API key 401; a full queue 503.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import tornado.httpserver
import tornado.ioloop
import tornado.iostream
import tornado.netutil
import tornado.queues
import tornado.web

from moetvm.errors import MoetvmError, one_line

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
OPTION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "repetition_penalty": "repetition_penalty", "seed": "seed"}
# Accepted at their neutral values only, so a client's defaults do not fail the request.
NEUTRAL_FIELDS = {"n": 1, "echo": False, "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0,
                  "best_of": 1, "suffix": None}


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


class Metrics:
    """Counters since the server started (read by /metrics; written by the worker thread)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = self.failed = self.prompt_tokens = self.generated_tokens = 0
        self.generating_seconds = 0.0
        self.queued = 0
        self.started = time.time()

    def add(self, **counts):
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


class Server:
    """The application around one model; `listen` starts it on the current IOLoop."""

    def __init__(self, model, model_id: str, api_key: str | None = None, max_queue: int = 64):
        self.model, self.model_id, self.api_key, self.max_queue = model, model_id, api_key, max_queue
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moetvm-generate")
        self.metrics = Metrics()
        self.app = tornado.web.Application([
            (r"/health", Health, {"server": self}),
            (r"/metrics", MetricsHandler, {"server": self}),
            (r"/v1/models", Models, {"server": self}),
            (r"/v1/completions", Completions, {"server": self, "chat": False}),
            (r"/v1/chat/completions", Completions, {"server": self, "chat": True}),
        ], default_handler_class=NotFound, default_handler_args={"server": self})

    def listen(self, port: int, host: str) -> int:
        """Bind and serve; returns the port (the one the OS chose for port 0)."""
        http = tornado.httpserver.HTTPServer(self.app, max_body_size=16 << 20)
        sockets = tornado.netutil.bind_sockets(port, host)
        http.add_sockets(sockets)
        return sockets[0].getsockname()[1]


class Handler(tornado.web.RequestHandler):
    def initialize(self, server: Server, **_):
        self.server = server

    def prepare(self):
        key = self.server.api_key
        if key and self.request.path != "/health":
            given = self.request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                self.fail(BadRequest("a valid API key is needed (Authorization: Bearer KEY)", 401, "authentication_error"))

    def fail(self, error: BadRequest):
        self.set_status(error.status)
        self.finish({"error": {"message": str(error), "type": error.kind, "param": None, "code": None}})

    def write_error(self, status_code, **kwargs):  # anything unexpected: still OpenAI's error shape, one line
        error = kwargs.get("exc_info", (None, None))[1]
        self.finish({"error": {"message": one_line(error) if error else self._reason, "type": "server_error",
                               "param": None, "code": None}})


class NotFound(Handler):
    def prepare(self):
        self.fail(BadRequest(f"no such endpoint {self.request.path}", 404, "not_found_error"))


class Health(Handler):
    def get(self):
        self.finish({"status": "ok"})


class Models(Handler):
    def get(self):
        self.finish({"object": "list", "data": [{"id": self.server.model_id, "object": "model",
                                                 "created": int(self.server.metrics.started), "owned_by": "moetvm"}]})


class MetricsHandler(Handler):
    def get(self):
        m, stats = self.server.metrics, self.server.model.stats()
        rate = m.generated_tokens / m.generating_seconds if m.generating_seconds else 0.0
        lines = [
            ("moetvm_requests_total", "counter", "requests answered", m.requests),
            ("moetvm_requests_failed_total", "counter", "requests refused or failed", m.failed),
            ("moetvm_requests_queued", "gauge", "requests waiting or running", m.queued),
            ("moetvm_prompt_tokens_total", "counter", "prompt tokens processed", m.prompt_tokens),
            ("moetvm_generated_tokens_total", "counter", "tokens generated", m.generated_tokens),
            ("moetvm_tokens_per_second", "gauge", "generated tokens per second of generation, since start", rate),
            ("moetvm_expert_cache_hit_rate", "gauge", "share of expert uses served from the cache", stats["hit_rate"]),
            ("moetvm_expert_loads_total", "counter", "experts loaded from storage", stats["expert_loads"]),
            ("moetvm_expert_cache_budget_bytes", "gauge", "expert cache budget", stats["cache_budget_bytes"]),
            ("moetvm_rss_bytes", "gauge", "resident memory of the process", _rss_bytes()),
            ("moetvm_peak_rss_bytes", "gauge", "peak resident memory of the process", int(stats["peak_rss_mb"] * 1e6)),
        ]
        self.set_header("Content-Type", "text/plain; version=0.0.4")
        self.finish("".join(f"# HELP {name} {text}\n# TYPE {name} {kind}\n{name} {value}\n"
                            for name, kind, text, value in lines))


class Completions(Handler):
    """/v1/completions and /v1/chat/completions, whole or streamed."""

    def initialize(self, server: Server, chat: bool):
        self.server, self.chat = server, chat
        self.cancelled = threading.Event()

    def on_connection_close(self):
        self.cancelled.set()  # the worker stops at the next token

    async def post(self):
        try:
            source, max_tokens, options, stream = self._parse()
        except BadRequest as e:
            self.server.metrics.add(failed=1)
            return self.fail(e)
        m = self.server.metrics
        if m.queued >= self.server.max_queue:
            m.add(failed=1)
            return self.fail(BadRequest(f"the server has {m.queued} requests waiting; try again later", 503, "server_busy"))
        events = tornado.queues.Queue()
        loop = tornado.ioloop.IOLoop.current()
        post = lambda *event: loop.add_callback(events.put_nowait, event)  # noqa: E731 - thread -> loop
        m.add(queued=1)
        self.server.worker.submit(self._generate, source, max_tokens, options, post)
        kind, value = await events.get()
        if kind == "error":
            m.add(failed=1)
            return self.fail(value)
        created, rid = int(time.time()), ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        text, ids, finish, usage = [], [], None, None
        if stream:
            self.set_header("Content-Type", "text/event-stream")
            self.set_header("Cache-Control", "no-cache")
            if self.chat:
                await self._send(self._chunk(rid, created, {"role": "assistant", "content": ""}, None))
        while True:
            kind, value = await events.get()
            if kind == "token":
                text.append(value.text)
                ids += [] if value.id is None else [value.id]
                if stream and (value.text or (not self.chat and value.id is not None)):
                    await self._send(self._chunk(rid, created, value.text, None,
                                                 [] if value.id is None else [value.id]))
            elif kind == "end":
                finish, usage = value
                break
            elif kind == "error":  # failed mid-way (an expert that cannot be loaded, say)
                if not stream:
                    return self.fail(value)
                await self._send({"error": {"message": str(value), "type": value.kind}})
                break
        if stream:
            if finish is not None:
                await self._send(self._chunk(rid, created, {} if self.chat else "", finish))
            self.write("data: [DONE]\n\n")
            return self.finish()
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": "".join(text)}} if self.chat
                      else {"text": "".join(text), "token_ids": ids})
        self.finish({"id": rid, "object": "chat.completion" if self.chat else "text_completion", "created": created,
                     "model": self.server.model_id, "choices": [choice], "usage": usage})

    def _generate(self, source, max_tokens, options, post):
        """On the worker thread: the whole generation, each token posted to the request's loop."""
        m, started = self.server.metrics, time.perf_counter()
        try:
            try:
                generation = self.server.model.stream(source, max_tokens, **options)
            except MoetvmError as e:
                return post("error", BadRequest(one_line(e)))
            post("start", None)
            for token in generation:
                post("token", token)
                if self.cancelled.is_set():
                    break
            done = len(generation.token_ids)
            m.add(requests=1, prompt_tokens=generation.prompt_tokens, generated_tokens=done,
                  generating_seconds=time.perf_counter() - started)
            post("end", (generation.finish_reason or "length", {
                "prompt_tokens": generation.prompt_tokens, "completion_tokens": done,
                "total_tokens": generation.prompt_tokens + done}))
        except MoetvmError as e:
            post("error", BadRequest(one_line(e), 500, "server_error"))
        except Exception as e:  # noqa: BLE001 - the request fails, the server goes on
            post("error", BadRequest(f"generation failed: {one_line(e)}", 500, "server_error"))
        finally:
            m.add(queued=-1)

    async def _send(self, payload):
        self.write(f"data: {json.dumps(payload)}\n\n")
        try:
            await self.flush()
        except tornado.iostream.StreamClosedError:
            self.cancelled.set()

    def _chunk(self, rid, created, piece, finish, token_ids=()):
        choice = {"index": 0, "finish_reason": finish}
        choice.update({"delta": piece if isinstance(piece, dict) else {"content": piece}} if self.chat
                      else {"text": piece, "logprobs": None, "token_ids": list(token_ids)})
        return {"id": rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": created, "model": self.server.model_id, "choices": [choice]}

    def _parse(self):
        """(prompt or messages, max_tokens, generation options, stream) from the JSON body."""
        try:
            body = json.loads(self.request.body or b"")
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        for name, neutral in NEUTRAL_FIELDS.items():
            if body.get(name, neutral) not in (neutral, None):
                raise BadRequest(f"{name}={body[name]!r} is not supported (only {neutral!r})")
        if self.chat:
            source = body.get("messages")
            if not isinstance(source, list) or not source or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in source):
                raise BadRequest("messages must be a non-empty list of {\"role\": text, \"content\": text} objects")
            source = [{"role": m["role"], "content": m["content"]} for m in source]
        else:
            source = body.get("prompt")
            if isinstance(source, list) and len(source) == 1 and isinstance(source[0], str):
                source = source[0]  # a batch of one text prompt
            ok_ids = isinstance(source, list) and source and all(type(i) is int for i in source)
            if not (isinstance(source, str) and source) and not ok_ids:
                raise BadRequest("prompt must be non-empty text or a list of token ids")
        default = DEFAULT_COMPLETION_TOKENS if not self.chat else None
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default))
        if max_tokens is None:  # chat without a bound: what the model's positions leave
            limit = self.server.model.manifest.model.max_positions or 2048
            max_tokens = max(limit - self._prompt_length(source), 1)
        if type(max_tokens) is not int or max_tokens < 1:
            raise BadRequest(f"max_tokens must be a positive integer, got {max_tokens!r}")
        options = {option: body[name] for name, option in OPTION_FIELDS.items() if body.get(name) is not None}
        options.setdefault("temperature", 1.0)  # OpenAI's default
        stop = body.get("stop")
        if stop is not None:
            stop = [stop] if isinstance(stop, str) else stop
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
                raise BadRequest("stop must be text or a list of at most 16 texts")
            options["stop"] = stop
        ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: exactly max_tokens (benchmarks)
        if not isinstance(ignore_eos, bool):
            raise BadRequest(f"ignore_eos must be true or false, got {ignore_eos!r}")
        options["ignore_eos"] = ignore_eos
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest(f"stream must be true or false, got {stream!r}")
        return source, max_tokens, options, stream

    def _prompt_length(self, messages) -> int:
        tokenizer = self.server.model.tokenizer
        try:
            return len(tokenizer.chat_ids(messages)) if tokenizer is not None else 0
        except MoetvmError as e:
            raise BadRequest(one_line(e)) from None


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def serve(model, host: str = "127.0.0.1", port: int = 8000, *, model_id: str, api_key: str | None = None,
          max_queue: int = 64, ready=None) -> None:
    """Serve `model` until interrupted; `ready(port)` is called once listening."""
    server = Server(model, model_id, api_key, max_queue)
    bound = server.listen(port, host)
    if ready is not None:
        ready(bound)
    try:
        tornado.ioloop.IOLoop.current().start()
    finally:
        server.worker.shutdown(wait=False, cancel_futures=True)
