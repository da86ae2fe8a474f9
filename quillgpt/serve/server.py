"""Running the app: a listening socket, `serve` (what `quill serve` does), `BackgroundServer`.

uvicorn comes with the serve extra, so it is imported where it is used.
"""

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
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
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
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
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
