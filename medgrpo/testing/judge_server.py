"""A small OpenAI-compatible chat-completions server on loopback, with a deterministic judge.

Tests and the reward benchmark talk to it through the real ``openai`` client, so the
judge's HTTP path (concurrency, timeouts, retries, parsing) is exercised end to end::

    with JudgeServer(api_key="sk-test") as server:
        server.push("429", "500")            # the next two requests fail, then all is well
        server.rule("[garbage]", "garbage")  # predictions containing "[garbage]" never parse
        judge = Judge(JudgeConfig(base_url=server.base_url, model="loopback-judge"))

``POST /v1/chat/completions`` reads the reference and the prediction between the
``<reference>``/``<prediction>`` tags of the judge prompt and answers the five scores of
:func:`deterministic_scores` as a JSON object. Actions, per request:

* ``ok``       the JSON scores
* any three-digit status (``429``, ``500``, ``503``, ``400``, ``418`` ...): that status with an
  OpenAI-style error body (``429`` with ``Retry-After: 0``)
* ``garbage``  200 with prose that is not the JSON object
* ``invalid``  200 with the JSON object but a score out of 1..5
* ``slow``     sleep ``slow_s`` seconds, then ``ok`` (longer than the client's timeout)

Replies that are not a chat completion at all (what a misconfigured proxy or server sends):

* ``not_json``        200, ``Content-Type: application/json``, a body that is not JSON
* ``untyped``         200 without a content type, a body that is not JSON
* ``html``            200, ``text/html``, an HTML page
* ``no_choices``      200, a JSON object without ``choices``
* ``empty_choices``   200, a chat completion with ``choices: []``
* ``string``          200, a bare JSON string
* ``null_content``    200, a chat completion whose message content is null
* ``empty_body``      200 with an empty body
* ``close``           close the connection without answering
* ``hang``            accept the request and never answer (until the server stops)

An action comes from the FIFO of :meth:`JudgeServer.push` first, else from the first
:meth:`JudgeServer.rule` whose substring is in the prediction, else ``ok``. Every request
also sleeps ``delay_s`` (so concurrent requests overlap and ``max_in_flight`` is meaningful).

:class:`JudgeServerProcess` runs the same server in a child process, so a benchmark times
the client alone, not the client and the server sharing one interpreter's GIL.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from medgrpo.rewards.judge import DIMENSIONS

ACTIONS = (
    "ok",
    "429",
    "500",
    "503",
    "garbage",
    "invalid",
    "slow",
    "not_json",
    "untyped",
    "html",
    "no_choices",
    "empty_choices",
    "string",
    "null_content",
    "empty_body",
    "close",
    "hang",
)
_REFERENCE = re.compile(r"<reference>\n(.*?)\n</reference>", re.DOTALL)
_PREDICTION = re.compile(r"<prediction>\n(.*?)\n</prediction>", re.DOTALL)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def deterministic_scores(reference: str, prediction: str) -> dict[str, int]:
    """The loopback judge's five 1..5 scores: recall of the reference's words, then per-dimension offsets.

    ``base = 1 + round(4 * |words(pred) & words(ref)| / |words(ref)|)``; dimensions 3 and 5
    (specificity, action/state) are one lower, floored at 1, so the five are not all equal.
    """
    ref = _words(reference)
    recall = len(_words(prediction) & ref) / len(ref) if ref else 0.0
    base = 1 + round(4 * recall)
    offsets = (0, 0, 1, 0, 1)
    return {name: max(1, base - off) for name, off in zip(DIMENSIONS, offsets)}


class JudgeServer:
    """Loopback OpenAI-compatible judge server (see the module docstring); a context manager."""

    def __init__(self, *, api_key: Optional[str] = None, delay_s: float = 0.0, slow_s: float = 2.0) -> None:
        self.api_key = api_key
        self.delay_s = delay_s
        self.slow_s = slow_s
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.actions_taken: list[str] = []
        self.bodies: list[dict[str, Any]] = []
        self.authorizations: set[str] = set()
        self._lock = threading.Lock()
        self._script: deque[str] = deque()
        self.stopped = threading.Event()
        self._rules: list[tuple[str, str]] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.judge_server = self  # type: ignore[attr-defined]
        self._thread: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1``, the OpenAI client's base URL."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> JudgeServer:
        """Serve on a daemon thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (requests still sleeping finish on their own threads)."""
        self.stopped.set()  # ends "hang" requests
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def push(self, *actions: str) -> None:
        """Queue actions for the next requests, in order (see the module docstring)."""
        for action in actions:
            _check_action(action)
        with self._lock:
            self._script.extend(actions)

    def rule(self, substring: str, action: str) -> None:
        """Answer ``action`` to every request whose prediction contains ``substring``."""
        _check_action(action)
        with self._lock:
            self._rules.append((substring, action))

    def reset_counters(self) -> None:
        """Zero ``requests``, ``max_in_flight`` and the recorded actions, bodies and headers."""
        with self._lock:
            self.requests = self.max_in_flight = 0
            self.actions_taken.clear()
            self.bodies.clear()
            self.authorizations.clear()

    def _begin(self, body: dict[str, Any], prediction: str, authorization: str) -> str:
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.bodies.append(body)
            self.authorizations.add(authorization)
            if self._script:
                action = self._script.popleft()
            else:
                action = next((a for s, a in self._rules if s in prediction), "ok")
            self.actions_taken.append(action)
            return action

    def _end(self) -> None:
        with self._lock:
            self.in_flight -= 1


def _check_action(action: str) -> None:
    if action not in ACTIONS and not (action.isdigit() and len(action) == 3):
        raise ValueError(f"unknown action {action!r}; one of {ACTIONS} or a three-digit HTTP status")


def _completion(model: str, content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the OpenAI client's connection pool expects
    # Headers and body go out in two writes; with Nagle's algorithm the body would wait for
    # the client's delayed ACK (~40 ms per request on Linux), which is not the judge's latency.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # silence the per-request access log
        pass

    def _send(
        self, status: int, payload: Any, *, raw: Optional[bytes] = None, content_type: Optional[str] = None
    ) -> None:
        """``status`` with ``payload`` as JSON, or with the bytes ``raw`` and ``content_type`` (None: no header)."""
        data = json.dumps(payload).encode() if raw is None else raw
        content_type = "application/json" if raw is None else content_type
        try:
            self.send_response(status)
            if content_type is not None:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and went away

    def do_POST(self) -> None:
        server: JudgeServer = self.server.judge_server  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        authorization = self.headers.get("Authorization", "")
        if server.api_key is not None and authorization != f"Bearer {server.api_key}":
            self._send(401, {"error": {"message": "bad api key", "type": "invalid_request_error"}})
            return
        text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        ref, pred = _REFERENCE.search(text), _PREDICTION.search(text)
        reference, prediction = (ref.group(1) if ref else ""), (pred.group(1) if pred else "")
        action = server._begin(body, prediction, authorization)
        try:
            if action == "hang":
                server.stopped.wait()
                self.close_connection = True
                return
            time.sleep(server.delay_s + (server.slow_s if action == "slow" else 0.0))
            self._answer(action, body.get("model", ""), reference, prediction)
        finally:
            server._end()

    def _answer(self, action: str, model: str, reference: str, prediction: str) -> None:
        if action.isdigit():
            self._send(int(action), {"error": {"message": f"loopback {action}", "type": "server_error"}})
        elif action in _BROKEN_REPLIES:
            status_body_type = _BROKEN_REPLIES[action]
            self._send(200, None, raw=status_body_type[0], content_type=status_body_type[1])
        elif action in ("no_choices", "empty_choices", "string", "null_content"):
            self._send(200, _odd_json(action, model))
        elif action == "close":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif action == "garbage":
            self._send(200, _completion(model, "The prediction looks mostly fine to me, maybe a 4?"))
        elif action == "invalid":
            scores = deterministic_scores(reference, prediction) | {DIMENSIONS[0]: 7}
            self._send(200, _completion(model, json.dumps(scores)))
        else:
            self._send(200, _completion(model, json.dumps(deterministic_scores(reference, prediction))))


# action -> (body, content type or None), all with status 200
_BROKEN_REPLIES = {
    "not_json": (b"upstream connect error or disconnect/reset before headers", "application/json"),
    "untyped": (b"OK", None),
    "html": (b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"),
    "empty_body": (b"", "application/json"),
}


def _odd_json(action: str, model: str) -> Any:
    """A JSON body that parses but is no usable chat completion."""
    if action == "string":
        return "the scores are all 5"
    completion = _completion(model, "")
    if action == "no_choices":
        del completion["choices"]
    elif action == "empty_choices":
        completion["choices"] = []
    else:  # null_content
        completion["choices"][0]["message"]["content"] = None
    return completion


def _serve_until_told(delay_s: float, conn) -> None:
    with JudgeServer(delay_s=delay_s) as server:
        conn.send(server.base_url)
        conn.recv()  # anything (or EOF when the parent dies) stops it


class JudgeServerProcess:
    """A :class:`JudgeServer` (``ok`` to every request after ``delay_s``) in a spawned child process.

    ``with JudgeServerProcess(delay_s=0.02) as base_url: ...``
    """

    def __init__(self, *, delay_s: float = 0.0) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_serve_until_told, args=(delay_s, child_conn), daemon=True)

    def __enter__(self) -> str:
        self._process.start()
        if not self._conn.poll(120):
            self._process.kill()
            raise RuntimeError("the judge server process did not start")
        return self._conn.recv()

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.send("stop")
        except (BrokenPipeError, OSError):
            pass
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
