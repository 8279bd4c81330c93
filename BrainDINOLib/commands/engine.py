"""`braindino info` and `braindino embed`: checkpoints and features."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .common import add_model_options, declare_files, open_session, parse_layers, tqdm_progress


def run_info(args: argparse.Namespace) -> int:
    from ..architecture import FEED_FORWARDS, POS_EMBED_RESIZES, parameter_count
    from ..checkpoints import backbone_skeleton, read_checkpoint

    checkpoint = read_checkpoint(args.checkpoint)
    skeleton, _ = backbone_skeleton(checkpoint)  # strict check and parameter count, without loading any weights
    arch = checkpoint.architecture
    info = {"path": str(checkpoint.path), "kind": checkpoint.kind, "model_id": checkpoint.model_id,
            "family": arch.family, "variant": arch.variant, "embed_dim": arch.embed_dim, "depth": arch.depth,
            "num_heads": arch.num_heads, "patch_size": arch.patch_size, "num_register_tokens": arch.num_register_tokens,
            "ffn": arch.ffn, "ffn_hidden_dim": arch.ffn_hidden_dim, "norm_eps": arch.norm_eps,
            "pos_embed_resize": arch.pos_embed_resize, "in_chans": arch.in_chans,
            "parameters": parameter_count(skeleton), "notes": checkpoint.notes}
    if checkpoint.card:
        info["card"] = json.loads(checkpoint.card.to_json())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    described = {"num_register_tokens": f"{arch.num_register_tokens} (register/storage tokens)",
                 "ffn": f"{arch.ffn}: {FEED_FORWARDS[arch.ffn]}",
                 "pos_embed_resize": f"{arch.pos_embed_resize}: {POS_EMBED_RESIZES[arch.pos_embed_resize]}"}
    for key in ("path", "kind", "model_id", "family", "variant", "embed_dim", "depth", "num_heads", "patch_size",
                "num_register_tokens", "ffn", "ffn_hidden_dim", "norm_eps", "pos_embed_resize", "in_chans"):
        print(f"{key:20s} {described.get(key, info[key])}")
    print(f"{'parameters':20s} {info['parameters']:,}")
    for note in checkpoint.notes:
        print(f"{'note':20s} {note}")
    if checkpoint.card:
        print(f"{'card':20s} {checkpoint.card.name}: {checkpoint.card.description}")
    return 0


def run_embed(args: argparse.Namespace) -> int:
    from ..volume import read_volume

    volume = read_volume(args.volume)  # a bad volume is refused before torch is imported
    session = open_session(args)
    layers = session.segmentation_layers if args.layers is None else args.layers
    progress, bar = tqdm_progress("embedding")
    started = time.perf_counter()
    with bar:
        features = session.features(volume, layers, progress=progress)
    elapsed = time.perf_counter() - started
    print(f"{features.describe()} from {args.volume} with {session.encoder.model_id} in {elapsed:.1f} s")
    if args.out:
        print(f"wrote {features.save(args.out)}")
    elif session.cache is not None:
        print(f"cached in {session.cache.root}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    info = commands.add_parser("info", help="show a checkpoint's kind and architecture")
    info.add_argument("checkpoint", help="checkpoint file or built-in model name")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=run_info)

    embed = commands.add_parser("embed", help="compute (and cache) the features of a volume")
    embed.add_argument("volume", help="NIfTI/NRRD/MHA file or DICOM folder")
    embed.add_argument("--out", type=Path, default=None, help="also write the features to this .safetensors file")
    embed.add_argument("--layers", type=parse_layers, default=None,
                       help="intermediate blocks to keep, e.g. 2,5,8,11 (default: the blocks segmentation reads; "
                            "'' for none)")
    add_model_options(embed)
    embed.set_defaults(run=run_embed)
    declare_files(embed, inputs={"volume": "file or folder"}, outputs={"out": "file"})
