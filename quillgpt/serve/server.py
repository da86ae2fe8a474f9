"""Running the app: a listening socket, `serve` (what `quill serve` does), `BackgroundServer`.

uvicorn comes with the serve extra, so it is imported where it is used. Connections go through
`guarded_protocol`: a request must arrive whole (head and body) within `read_timeout_s`, and at
`max_connections` the connection that has waited longest for a request that has not come is
closed to make room, so idle or half-sent connections never starve the others.
"""

import resource
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..chat import has_chat_template
from ..checkpoint import MODEL_FILE
from ..errors import QuillError, shown
from ..model import count_params
from .guard import default_allowed_hosts
from .routes import create_app
from .schemas import ServeSettings


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, or QuillError (port in use, bad host) as one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise QuillError(f"cannot resolve host {shown(host)}: {e.strerror}") from None
    except (UnicodeError, ValueError) as e:  # a name no resolver takes (an empty label, ...)
        raise QuillError(f"--host {shown(host)} is not a host name or address ({e})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise QuillError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def guarded_protocol(settings: ServeSettings) -> type:
    """uvicorn's h11 protocol with a read deadline per request and a cap on connections."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timeout = settings.read_timeout_s
    cap = connection_cap(settings.max_connections)

    class GuardedH11Protocol(H11Protocol):
        deadline: Any = None
        waiting_since = 0.0

        def waiting(self) -> bool:
            """Waiting for a request, or for the rest of one: nothing of this connection's is running
            but (perhaps) a route waiting for its body."""
            their, cycle = self.conn.their_state, self.cycle
            return their is h11.SEND_BODY or (their is h11.IDLE and (cycle is None or cycle.response_complete))

        def arm(self) -> None:
            self.disarm()
            self.waiting_since = time.monotonic()
            self.deadline = self.loop.call_later(timeout, self.timed_out)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def timed_out(self) -> None:
            self.deadline = None
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                self.transport.close()  # a request that never came whole

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.arm()
            if len(self.connections) > cap:  # make room: the longest wait for a request goes
                idle = [c for c in self.connections if c is not self and getattr(c, "waiting", None)
                        and c.waiting()]
                victim = min(idle, key=lambda c: c.waiting_since) if idle else self
                victim.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self.disarm()  # the request came whole (or the connection ended)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self.arm()  # the next request on this connection: the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


def connection_cap(wanted: int) -> int:
    """`wanted` connections, or fewer where the open-file limit would be reached first (each
    connection is a file descriptor; the model, the log and the loop need some too)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return wanted
    return max(1, min(wanted, soft - 64)) if soft != resource.RLIM_INFINITY else wanted


def uvicorn_config(app: Any, settings: ServeSettings, log_level: str = "warning") -> Any:
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2, http=guarded_protocol(settings),
                          timeout_keep_alive=min(5, int(settings.read_timeout_s) or 1))


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          weights: str = MODEL_FILE, settings: ServeSettings | None = None,
          log: Any = print, log_level: str = "warning", dtype: str = "float32") -> None:
    """Load `run_dir` (weights in `dtype`) and serve it until interrupted (what `quill serve` does)."""
    try:
        import uvicorn
    except ImportError:
        raise QuillError("quill serve needs the serve extra: pip install 'quillgpt[serve]'") from None
    sock = bind_socket(host, port)
    settings = settings or ServeSettings()
    if settings.allowed_hosts == ServeSettings().allowed_hosts:  # not chosen: this server's names
        settings.allowed_hosts = default_allowed_hosts(host)
    app = create_app(run_dir, settings, device, weights, dtype=dtype, warn=lambda m: log(f"warning: {m}"))
    card = app.state.engine.run
    actual_port = sock.getsockname()[1]
    where = f"[{host}]" if ":" in host else host
    api = "/v1/completions, /v1/chat/completions" if has_chat_template(card.tokenizer) else "/v1/completions"
    if settings.tools:
        api += f"; tools run here: {', '.join(settings.tools)}"
    log(f"serving {Path(run_dir)} ({count_params(card.model) / 1e6:.2f}M parameters) on "
        f"http://{where}:{actual_port}/  (API: {api}; Ctrl-C stops)")
    try:
        uvicorn.Server(uvicorn_config(app, settings, log_level)).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then passed Ctrl-C on
        pass
    log("server stopped")


class BackgroundServer:
    """Serve an app on a background thread (a notebook, tests): `with BackgroundServer(app) as url:`.

    `port=0` picks a free port; `url` is then the address actually listened on.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        settings = getattr(getattr(app, "state", None), "settings", None) or ServeSettings()
        self.server = uvicorn.Server(uvicorn_config(app, settings))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="quill-serve", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
