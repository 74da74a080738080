"""`craftvla serve`: a trained policy behind a websocket, in openpi's protocol.

    craftvla serve --checkpoint runs/train/checkpoints/last --port 8000 [--api_key_file FILE]

Protocol (openpi's `WebsocketPolicyServer` / `WebsocketClientPolicy`, msgpack encoding in
protocol.py): on connect the server sends its metadata (camera keys, state and action sizes,
chunk size, image size); then each binary message is one observation dict
    {"observation.images.<cam>": (H, W, 3) uint8, "observation.state": (S,), "task": str}
("prompt" is accepted for "task", openpi's name) and the answer is
    {"actions": (H, A) float32 in robot units, "server_timing": {"infer_ms", "batch_size", "prev_total_ms"}}.
A request the server cannot serve gets one text frame with the reason (at most 300 characters),
then the connection is closed: 1011 for a bad request or one not answered within
--server.request_timeout_s, 1013 (try again later) when --server.max_queue requests already wait;
the server keeps serving everyone else. A message over --server.max_message_mb is closed with 1009
by the websocket layer, a connection past --server.max_connections is answered HTTP 503, and the
request of a client that disconnected while it waited is dropped before it is computed.
Requests are validated by the policy (model/observations.py, the --limits.* flags) before any
tensor is built. `GET /healthz` answers 200 "OK".
With an API key (--api_key_file, or $CRAFTVLA_API_KEY), clients must send `Authorization: Api-Key <key>`
(openpi's header); more than one Authorization header is refused with 400.

Requests from different clients that wait at the same time run as one batch (`policy.infer_batch`,
up to --max_batch), on one inference thread, so the event loop stays free for I/O. SIGINT / SIGTERM
stop accepting, close the connections (1001 going away) and exit 0.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from craftvla.errors import ConfigError, CraftVLAError, require
from craftvla.keys import API_KEY_ENV, TASK_KEY
from craftvla.model.observations import ObservationLimits

from . import protocol

log = logging.getLogger(__name__)
PROMPT_KEY = "prompt"  # openpi's name for the instruction


@dataclass
class ServerLimits:
    """What the server takes on at once; beyond it a client gets a clear answer, never a hang."""

    # Largest request accepted, MiB (3 cameras of 640 x 480 are 2.6 MiB); bigger: close 1009 (too big).
    max_message_mb: float = 8.0
    # Requests waiting for the inference thread; one more gets a "busy" frame, then close 1013 (try again later).
    max_queue: int = 64
    # Open connections; one more is answered HTTP 503 at the handshake.
    max_connections: int = 64
    # A request not answered within this many seconds gets a "timed out" frame, then close 1011; its
    # work is dropped if it has not started. (Requests of connections that closed are dropped too.)
    request_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_message_mb", "request_timeout_s"):
            require(getattr(self, name) > 0, f"server.{name}", getattr(self, name), "must be > 0")
        for name in ("max_queue", "max_connections"):
            require(getattr(self, name) >= 1, f"server.{name}", getattr(self, name), "must be >= 1")


class Busy(CraftVLAError):
    """The server is at a limit: the request is refused now and may succeed later."""


@dataclass
class ServeConfig:
    """Flags of `craftvla serve`."""

    # a save_pretrained directory; the default is where `craftvla train` writes by default
    checkpoint: str = "runs/train/checkpoints/last"
    host: str = "127.0.0.1"  # interface to listen on (0.0.0.0: every interface)
    port: int = 8000  # TCP port (0: any free port, printed at start)
    # require "Authorization: Api-Key <key>" from clients, the key read from this file (one line);
    # None = the CRAFTVLA_API_KEY environment variable, else no key
    api_key_file: Optional[str] = None
    api_key: str = ""  # the key itself: visible to every local user in `ps`; use api_key_file (tests only)
    max_batch: int = 8  # requests waiting at the same time are run as one batch of up to this many
    device: str = "cpu"  # torch device of the policy
    precision: str = "auto"  # inference autocast: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32
    compile: bool = False  # torch.compile the inference path (the first request pays the compilation)
    # what a request may hold (model/observations.py; `policy.infer` applies the same checks)
    limits: ObservationLimits = field(default_factory=ObservationLimits)
    # what the server takes on at once (message size, queue, connections, time per request)
    server: ServerLimits = field(default_factory=ServerLimits)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port={self.port}: must be in 0..65535")
        if self.max_batch < 1:
            raise ConfigError(f"--max_batch={self.max_batch}: must be >= 1")


def resolve_api_key(cfg: ServeConfig) -> str:
    """The key clients must send: --api_key_file's, else $CRAFTVLA_API_KEY, else --api_key (with a
    warning: the command line is public); "" = no key. Two sources given at once are refused."""
    given = [name for name, value in (("--api_key_file", cfg.api_key_file), ("--api_key", cfg.api_key)) if value]
    if len(given) > 1:
        raise ConfigError("give the API key once: --api_key_file or --api_key, not both")
    if cfg.api_key_file:
        path = Path(cfg.api_key_file)
        try:
            key = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--api_key_file={path}: cannot read it ({type(err).__name__})") from None
        if not key or "\n" in key:
            raise ConfigError(f"--api_key_file={path}: expected one non-empty line (the key)")
        return key
    if cfg.api_key:
        log.warning("--api_key is visible to every local user (ps, /proc); prefer --api_key_file or $%s", API_KEY_ENV)
        return cfg.api_key
    return os.environ.get(API_KEY_ENV, "").strip()


def policy_metadata(policy) -> dict[str, Any]:
    """What a client needs to build observations: sent once on connect."""
    cfg = policy.config
    return {
        "server": "craftvla",
        "camera_keys": list(cfg.camera_keys),
        "image_size": int(cfg.vision.image_size),
        "state_dim": int(cfg.state_dim),
        "action_dim": int(cfg.action_dim),
        "chunk_size": int(cfg.chunk_size),
        "instruction_key": TASK_KEY,
        "stats_source": policy.processor.stats_source,
    }


class PolicyServer:
    """Serves `policy.infer_batch` over websockets; `run()` blocks until SIGINT / SIGTERM,
    `serve(ready, stop)` is the same as a coroutine (tests and benchmarks run it in a thread)."""

    def __init__(
        self,
        policy,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str = "",
        max_batch: int = 8,
        limits: Optional[ServerLimits] = None,
    ):
        self.policy, self.host, self.port = policy, host, port
        self.api_key, self.max_batch = api_key, max_batch
        self.limits = limits or ServerLimits()
        self.metadata = policy_metadata(policy)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="craftvla-infer")
        self._queue: Optional[asyncio.Queue] = None
        self._open = 0  # connections being served

    # ----- lifecycle ------------------------------------------------------------------------------
    def run(self) -> None:
        asyncio.run(self._run_until_signal())

    async def _run_until_signal(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.serve(stop=stop)

    async def serve(self, ready: Optional[asyncio.Event] = None, stop: Optional[asyncio.Event] = None) -> None:
        """Listen until `stop` is set; `ready` is set once the port is bound (self.port then holds it)."""
        from websockets.asyncio.server import serve

        self._queue = asyncio.Queue()
        batcher = asyncio.create_task(self._batcher())
        try:
            async with serve(
                self._handler,
                self.host,
                self.port,
                compression=None,
                max_size=int(self.limits.max_message_mb * 2**20),
                process_request=self._process_request,
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                log.info(
                    "serving on ws://%s:%d (health: http://%s:%d/healthz)", self.host, self.port, self.host, self.port
                )
                if ready is not None:
                    ready.set()
                await (stop.wait() if stop is not None else asyncio.Future())
                server.close()  # connections get 1001 "going away"
                await server.wait_closed()
        finally:
            batcher.cancel()
            self._executor.shutdown(wait=True)

    # ----- HTTP: health check and API key ---------------------------------------------------------
    def _process_request(self, connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        given = request.headers.get_all("Authorization")
        if len(given) > 1:  # which one would count? refuse rather than guess
            return connection.respond(http.HTTPStatus.BAD_REQUEST, "more than one Authorization header\n")
        if self.api_key:
            key = given[0] if given else ""
            if not hmac.compare_digest(key.encode(), f"Api-Key {self.api_key}".encode()):
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        if self._open >= self.limits.max_connections:
            return connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                f"busy: {self._open} connections open, the limit (--server.max_connections); retry later\n",
            )
        return None

    # ----- one connection -------------------------------------------------------------------------
    async def _handler(self, websocket) -> None:
        from websockets.exceptions import ConnectionClosed

        self._open += 1
        try:
            await websocket.send(protocol.pack(self.metadata))
            await self._serve_requests(websocket)
        except ConnectionClosed:
            pass
        finally:
            self._open -= 1

    async def _serve_requests(self, websocket) -> None:
        closed = asyncio.ensure_future(websocket.wait_closed())  # one watcher per connection
        try:
            await self._answer(websocket, closed)
        finally:
            closed.cancel()

    async def _answer(self, websocket, closed: asyncio.Future) -> None:
        previous: Optional[float] = None
        async for message in websocket:
            start = time.perf_counter()
            try:
                result = await self._infer(_observation(message), closed)
            except Busy as err:  # the server's state, not the request: retry later
                await websocket.send(short_reason(f"craftvla serve: {err}"))
                await websocket.close(code=1013, reason="busy; retry later")
                return
            except CraftVLAError as err:  # the request's fault: say why, close, serve the others
                await websocket.send(short_reason(f"craftvla serve: {err}"))
                await websocket.close(code=1011, reason="bad request; the reason is in the previous frame")
                return
            if result is None:  # the client left while its request waited
                return
            actions, infer_ms, batch = result
            timing = {"infer_ms": infer_ms, "batch_size": batch}
            if previous is not None:
                timing["prev_total_ms"] = previous
            await websocket.send(protocol.pack({"actions": actions, "server_timing": timing}))
            previous = (time.perf_counter() - start) * 1000

    async def _infer(self, obs: dict, closed: asyncio.Future) -> Optional[tuple[np.ndarray, float, int]]:
        """Queue one request and wait for its answer; None when the connection closes first
        (`closed` completes; the request is then dropped unless its batch already started)."""
        if self._queue.qsize() >= self.limits.max_queue:
            raise Busy(f"busy: {self._queue.qsize()} requests queued, the limit (--server.max_queue); retry later")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((obs, future))
        done, _ = await asyncio.wait(
            {future, closed}, timeout=self.limits.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if future in done:
            return future.result()
        future.cancel()  # the batcher skips it if it has not started
        if closed in done:
            return None
        raise CraftVLAError(
            f"no answer within {self.limits.request_timeout_s:g} s (--server.request_timeout_s): the server is overloaded"
        )

    # ----- batching -------------------------------------------------------------------------------
    async def _batcher(self) -> None:
        """Take every request waiting (up to max_batch), run them as one batch on the inference thread."""
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(obs, future) for obs, future in batch if not future.done()]  # timed out or client gone
            if not batch:
                continue
            start = time.perf_counter()
            results = await loop.run_in_executor(self._executor, self._infer_many, [obs for obs, _ in batch])
            infer_ms = (time.perf_counter() - start) * 1000
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result((result, infer_ms, len(batch)))

    def _infer_many(self, observations: list[dict]) -> list:
        """(H, A) actions per observation, or the error of each one that cannot be served."""
        try:
            return list(self.policy.infer_batch(observations))
        except Exception as err:  # noqa: BLE001  one bad request must not stop the server
            if len(observations) > 1:
                return [self._infer_many([obs])[0] for obs in observations]  # find who caused it
            if not isinstance(err, CraftVLAError):
                log.exception("inference failed")
                err = CraftVLAError(f"inference failed: {type(err).__name__}: {' '.join(str(err).split())}")
            return [err]


MAX_REASON_CHARS = 300  # an error frame says what is wrong, never echoes a whole request back


def short_reason(text: str) -> str:
    """One line of at most MAX_REASON_CHARS characters."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def _observation(message) -> dict:
    """A decoded request: a dict with string keys; openpi's "prompt" accepted for the instruction.
    Whatever a client sends, the outcome is this dict or a CraftVLAError saying why not (the
    decoder's guarantee, protocol.unpack)."""
    if isinstance(message, str):
        raise CraftVLAError("expected a binary msgpack message, got a text frame")
    obs = protocol.unpack(message)
    if not isinstance(obs, dict) or not all(isinstance(k, str) for k in obs):
        raise CraftVLAError(f"expected an observation dict with string keys, got {type(obs).__name__}")
    if TASK_KEY not in obs and PROMPT_KEY in obs:
        obs[TASK_KEY] = obs.pop(PROMPT_KEY)
    if isinstance(obs.get(TASK_KEY), bytes):
        try:
            obs[TASK_KEY] = obs[TASK_KEY].decode()
        except UnicodeDecodeError:
            raise CraftVLAError(f"{TASK_KEY} is not valid UTF-8") from None
    return obs


def main(argv: list[str]) -> int:
    """CLI entry: load the checkpoint, serve until interrupted."""
    from craftvla.cli.parsing import parse_config
    from craftvla.model.policy import VLAPolicy

    cfg = parse_config(ServeConfig, args=argv, prog="craftvla serve")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    api_key = resolve_api_key(cfg)
    policy = VLAPolicy.from_pretrained(cfg.checkpoint, map_location=cfg.device).eval()
    policy.processor.limits = cfg.limits
    policy.set_inference_precision(cfg.precision)
    if cfg.compile:
        policy.compile_inference()
    server = PolicyServer(policy, cfg.host, cfg.port, api_key, cfg.max_batch, cfg.server)
    print(f"craftvla serve: {cfg.checkpoint} (Ctrl-C to stop)", flush=True)
    server.run()
    print("craftvla serve: stopped", flush=True)
    return 0
