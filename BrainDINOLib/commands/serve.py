"""`braindino serve`: BrainDINO in a web browser, on Slicer's slice views (trame-slicer), for servers without a
desktop. Needs the web extra: `pip install braindino[web]`."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from .common import add_model_options, declare_files, int_between, policy_from_args


def run_serve(args: argparse.Namespace) -> int:
    from ..atlas import DATA
    from ..errors import BrainDINOError
    from ..web.config import ServeConfig
    from ..web.safety import DataFolder, OutputFolder, connection_token

    token = connection_token(args.host, args.token)  # refused before anything slow is loaded
    data = DataFolder(args.data or DATA)
    OutputFolder(args.out)
    if args.volume:
        data.resolve(args.volume)
    if importlib.util.find_spec("trame_slicer") is None:
        raise BrainDINOError("braindino serve", "needs the web extra: pip install 'braindino[web]'")
    config = ServeConfig(data=data.root, out=args.out, host=args.host, port=args.port, token=token, model=args.model,
                         device=args.device, precision=args.precision,
                         policy=lambda device_type: policy_from_args(args, device_type),
                         use_cache=not args.no_cache, cache_dir=args.cache_dir, batch_size=args.batch_size,
                         volume=args.volume)
    from ..web.server import serve

    return serve(config, announce=print)


def register(commands: argparse._SubParsersAction) -> None:
    text = ("Serve BrainDINO as a web page: Slicer's axial, coronal and sagittal views of a volume, with features, "
            "PCA colours, clusters, attention, similarity to a clicked point, few-shot segmentation from painted "
            "slices, fitted heads, and saving. For GPU servers and cluster nodes without a desktop: rendering is "
            "off-screen. Listens on this machine only unless --host says otherwise; then every page must present "
            "a token (given with --token, or generated and printed). The page opens files under --data only and "
            "writes under --out only. Needs the web extra (pip install 'braindino[web]').")
    parser = commands.add_parser("serve", help="BrainDINO in a web browser (Slicer's slice views, off-screen)",
                                 description=text)
    parser.add_argument("--data", type=Path, default=None,
                        help="folder whose volumes, label files, checkpoints and heads the page may open "
                             "(default: the bundled sample's folder)")
    parser.add_argument("--out", type=Path, default=Path("braindino-output"),
                        help="folder the page saves into (default: ./braindino-output)")
    parser.add_argument("--volume", default=None, help="volume to open at start, relative to --data")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)")
    parser.add_argument("--port", type=int_between(0, 65535), default=8080, help="port (default 8080; 0: any free)")
    parser.add_argument("--token", default=None,
                        help="secret every page must present (?secret=... in its address); default: none on "
                             "loopback, a random one printed at start on any other address")
    add_model_options(parser)
    parser.set_defaults(run=run_serve)
    declare_files(parser, inputs={"data": "data folder"}, outputs={"out": "folder"})
