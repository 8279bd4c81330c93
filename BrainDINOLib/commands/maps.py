"""`braindino pca | similarity | attention | cluster`: feature maps of one volume, as volumes and PNG montages."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..map_defaults import MAP_DEFAULTS
from .common import add_model_options, declare_files, int_between, open_session, tqdm_progress

if TYPE_CHECKING:
    import numpy as np


def output_path(text: str) -> Path:
    """An output volume path with a format `write_volume` knows (checked before any work is done)."""
    from ..volume import WRITABLE_SUFFIXES

    if not text.endswith(WRITABLE_SUFFIXES):
        raise argparse.ArgumentTypeError(f"{text}: unknown output format; use one of {', '.join(WRITABLE_SUFFIXES)}")
    return Path(text)


def png_path(text: str) -> Path:
    if not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"{text}: picture files must end in .png")
    return Path(text)


def parse_point(text: str) -> np.ndarray:
    import numpy as np

    try:
        values = [float(x) for x in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not np.isfinite(values).all():
        raise argparse.ArgumentTypeError(f"expected three comma-separated millimetres X,Y,Z, got {text!r}")
    return np.array(values)


def _features(session, volume, layers=()):
    """Features of `volume` from the session (its caches, or the encoder with a progress bar)."""
    progress, bar = tqdm_progress(f"embedding {Path(volume.source).name}")
    with bar:
        return session.features(volume, layers, progress=progress)


def _write(volume, path: Path, what: str) -> None:
    from ..volume import write_volume

    write_volume(volume, path)
    print(f"wrote {path} ({what})")


def _montage(volume, overlay, path: Path | None, style, title: str, mask=None, point_lps=None) -> None:
    if path is None:
        return
    from ..montage import save_montage

    save_montage(volume, overlay, path, style, title=title, mask=mask, point_lps=point_lps)
    print(f"wrote {path} (picture)")


def run_pca(args: argparse.Namespace) -> int:
    from ..volume import read_volume

    volume = read_volume(args.volume)  # a bad volume is refused before torch is imported
    from ..maps import pca_map
    from ..montage import OverlayStyle

    session = open_session(args)
    features = _features(session, volume)
    result = pca_map(features, components=args.components, remove_background=not args.keep_background,
                     seed=args.seed)
    variance = ", ".join(f"{v:.1%}" for v in result.explained_variance_ratio)
    _write(result.rgb, args.out, "RGB of principal components 1-3")
    if args.components_out:
        _write(result.components, args.components_out, f"{args.components} principal components")
    print(f"explained variance: {variance}")
    _montage(volume, result.rgb, args.png, OverlayStyle("rgb", alpha=0.8),
             f"PCA of {session.encoder.model_id} features: {Path(args.volume).name}")
    return 0


def run_similarity(args: argparse.Namespace) -> int:
    from ..volume import ras_to_lps, read_volume

    point_lps = args.point_lps if args.point_lps is not None else ras_to_lps(args.point_ras)
    volume = read_volume(args.volume)  # a bad volume is refused before torch is imported
    from ..maps import SimilarityIndex
    from ..maps.similarity import voxel_of_point
    from ..montage import OverlayStyle

    voxel_of_point(volume.geometry, point_lps)  # refuse a point outside the volume before the slow part
    session = open_session(args)
    features = _features(session, volume)
    source = SimilarityIndex(features)
    if args.target is None:
        target_volume, target_features, similarity = volume, features, source.map(point_lps)
    else:
        target_volume = read_volume(args.target)
        target_features = _features(session, target_volume)
        similarity = SimilarityIndex(target_features).map_query(source.query(point_lps))
    where = f"LPS ({', '.join(f'{v:g}' for v in point_lps)}) mm"
    _write(similarity, args.out, f"cosine similarity to {where} of {Path(args.volume).name}")
    _montage(target_volume, similarity, args.png,
             OverlayStyle("scalar", cmap="inferno", vmax=1.0, alpha=0.6, label="cosine similarity"),
             f"similarity to {where} of {Path(args.volume).name}", mask=target_features.foreground,
             point_lps=point_lps if args.target is None else None)
    return 0


def run_attention(args: argparse.Namespace) -> int:
    from ..volume import read_volume

    volume = read_volume(args.volume)  # a bad volume is refused before torch is imported
    from ..maps import attention_map
    from ..montage import OverlayStyle
    from ..slices import foreground_mask

    session = open_session(args)
    progress, bar = tqdm_progress("attention")
    with bar:
        result = attention_map(session, volume, progress=progress)
    _write(result.mean, args.out, "last-block CLS attention, mean over heads")
    if args.heads_out:
        _write(result.heads, args.heads_out, f"last-block CLS attention, {result.heads.array.shape[-1]} heads")
    _montage(volume, result.mean, args.png, OverlayStyle("scalar", cmap="viridis", alpha=0.6, label="attention"),
             f"last-block CLS attention: {Path(args.volume).name}", mask=foreground_mask(volume))
    return 0


def run_cluster(args: argparse.Namespace) -> int:
    from ..volume import read_volume

    volume = read_volume(args.volume)  # a bad volume is refused before torch is imported
    from ..maps import cluster_map
    from ..montage import OverlayStyle

    session = open_session(args)
    features = _features(session, volume)
    labels = cluster_map(features, k=args.clusters, seed=args.seed)
    _write(labels, args.out, f"{args.clusters} k-means regions, 0 = background")
    names = {label: f"cluster {label}" for label in range(1, args.clusters + 1)}
    _montage(volume, labels, args.png, OverlayStyle("labels", alpha=0.5, names=names),
             f"{args.clusters} feature clusters: {Path(args.volume).name}")
    return 0


def _map_parser(commands: argparse._SubParsersAction, name: str, help_text: str, out_help: str):
    parser = commands.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("volume", help="NIfTI/NRRD/MHA file or DICOM folder")
    parser.add_argument("--out", type=output_path, required=True, help=f"{out_help} (.nii, .nii.gz, .nrrd or .mha; "
                                                                       "written on the input's exact grid)")
    parser.add_argument("--png", type=png_path, default=None,
                        help="also write a PNG montage (axial, coronal, sagittal slices with the map overlaid)")
    add_model_options(parser)
    return parser


def register(commands: argparse._SubParsersAction) -> None:
    pca = _map_parser(commands, "pca", "PCA of the patch features as an RGB volume", "RGB volume (uint8 x 3)")
    pca.add_argument("--components", type=int_between(1, 64), default=MAP_DEFAULTS.components,
                     help="principal components to keep (default %(default)s)")
    pca.add_argument("--components-out", type=output_path, default=None,
                     help="also write the first --components components as a float vector volume")
    pca.add_argument("--keep-background", action="store_true",
                     help="fit on every patch and keep colours outside the head mask")
    pca.add_argument("--seed", type=int, default=MAP_DEFAULTS.seed,
                     help="seed of the token subsample (default %(default)s)")
    pca.set_defaults(run=run_pca)
    declare_files(pca, inputs={"volume": "file or folder"},
                  outputs={"out": "file", "png": "file", "components_out": "file"})

    similarity = _map_parser(commands, "similarity", "cosine similarity of every voxel's feature to one point's",
                             "similarity volume (float32 in [-1, 1])")
    point = similarity.add_mutually_exclusive_group(required=True)
    point.add_argument("--point-ras", type=parse_point, metavar="R,A,S",
                       help="the point in RAS mm (Slicer's coordinates), e.g. -24,4,2")
    point.add_argument("--point-lps", type=parse_point, metavar="L,P,S",
                       help="the point in LPS mm (DICOM/ITK coordinates), e.g. 24,-4,2")
    similarity.add_argument("--target", default=None,
                            help="map the similarity over this other volume instead (find the structure there)")
    similarity.set_defaults(run=run_similarity)
    declare_files(similarity, inputs={"volume": "file or folder", "target": "file or folder"},
                  outputs={"out": "file", "png": "file"})

    attention = _map_parser(commands, "attention", "last-block CLS-to-patch attention (mean over heads)",
                            "mean attention volume (float32)")
    attention.add_argument("--heads-out", type=output_path, default=None,
                           help="also write one attention channel per head as a vector volume")
    attention.set_defaults(run=run_attention)
    declare_files(attention, inputs={"volume": "file or folder"},
                  outputs={"out": "file", "png": "file", "heads_out": "file"})

    cluster = _map_parser(commands, "cluster", "k-means regions of the patch features (unsupervised parcellation)",
                          "label volume (uint8, 0 = background)")
    cluster.add_argument("-k", "--clusters", type=int_between(1, 255), default=MAP_DEFAULTS.clusters,
                         help="number of regions (default %(default)s)")
    cluster.add_argument("--seed", type=int, default=MAP_DEFAULTS.seed, help="k-means seed (default %(default)s)")
    cluster.set_defaults(run=run_cluster)
    declare_files(cluster, inputs={"volume": "file or folder"}, outputs={"out": "file", "png": "file"})
