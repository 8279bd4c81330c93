"""`braindino serve`: the trame server that hosts the page, off-screen, with its connection token.

Rendering needs no display: VTK's EGL render window draws with whatever EGL the machine has (Mesa's llvmpipe on
a CPU server, the NVIDIA driver on a GPU node), chosen before VTK loads. trame reads the process's command line
by default, and would take `braindino serve --host ...` for its own: it is told to read nothing.
"""
from __future__ import annotations

import os

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # off-screen, no X server
os.environ["TRAME_ARGS"] = ""  # trame parses this instead of sys.argv

import hmac  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from trame.app import get_server  # noqa: E402
from trame_slicer import module as trame_slicer_module  # noqa: E402
from trame_slicer.core import SlicerApp  # noqa: E402
from vtkmodules.vtkCommonCore import vtkLogger, vtkOutputWindow  # noqa: E402
from wslink.websocket import LinkProtocol  # noqa: E402

from ..cache import FeatureCache  # noqa: E402
from ..errors import BrainDINOError  # noqa: E402
from ..logic import BrainDINOLogic, Job  # noqa: E402
from .config import ServeConfig  # noqa: E402
from .page import BrainDINOPage, rss_mib  # noqa: E402
from .ui import build_page  # noqa: E402

log = logging.getLogger(__name__)


class TokenGate(LinkProtocol):
    """Decides wslink's connection handshake: the page must send the server's token.

    wslink asks every link protocol that has `validateToken`; with one present, its built-in comparison against
    `--authKey` (by default "wslink-secret", which every trame page sends) no longer applies. The page sends the
    `secret` of its URL. A refused client gets "Authentication failed", and wslink refuses its every later call.
    """

    def __init__(self, token: str):
        super().__init__()
        self._token = token.encode()

    async def validateToken(self, token, client_id) -> bool:  # noqa: N802  (wslink's name)
        return isinstance(token, str) and hmac.compare_digest(token.encode(), self._token)


def page_url(config: ServeConfig, port: int) -> str:
    """The address to open: the host as given (this machine's name for a wildcard bind), with the token."""
    host = socket.gethostname() if config.host in ("0.0.0.0", "::", "") else config.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/" + (f"?secret={config.token}" if config.token else "")


def quiet_vtk() -> None:
    """VTK errors only on the console: trame-slicer's views trigger a deprecation warning of VTK 9.6 per view."""
    vtkLogger.SetStderrVerbosity(vtkLogger.VERBOSITY_ERROR)
    vtkOutputWindow.GetInstance().SetDisplayModeToNever()  # errors still reach vtkLogger


def serve(config: ServeConfig, announce: Callable[[str], None]) -> int:
    """Build the page and serve it until interrupted; `announce` gets one line with the address once it listens."""
    started = time.perf_counter()
    quiet_vtk()
    server = get_server(name="braindino", client_type="vue3")
    server.enable_module(trame_slicer_module)
    if config.token:
        server.add_protocol_to_configure(lambda root: root.registerLinkProtocol(TokenGate(config.token)))
    slicer_app = SlicerApp()
    logic = BrainDINOLogic(slicer_app.scene, cache=FeatureCache(config.cache_dir) if config.use_cache else None)
    page = BrainDINOPage(server, slicer_app, logic, Job, config)
    build_page(server, page.views)
    if config.volume:
        page.state.volume_name = config.volume  # opened when the server starts

    def ready(**_) -> None:
        announce(f"BrainDINO page: {page_url(config, server.port)}  (ready after {time.perf_counter() - started:.1f} s,"
                 f" server memory {rss_mib()} MiB; Ctrl-C stops it)")
    server.controller.on_server_ready.add(ready)
    try:
        server.start(host=config.host, port=config.port, open_browser=False, timeout=0, show_connection_info=False,
                     disable_logging=True)
    except OSError as error:
        raise BrainDINOError(f"{config.host}:{config.port}", f"cannot listen there: {error.strerror or error}") \
            from None
    finally:
        logic.shutdown()  # a running job stops at its next check
    return 0
