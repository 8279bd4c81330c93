"""`braindino info` and `braindino embed`: checkpoints and features."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from .common import add_model_options, parse_layers, tqdm_progress


def run_info(args: argparse.Namespace) -> int:
    from ..architecture import parameter_count
    from ..checkpoints import load_backbone, read_checkpoint

    checkpoint = read_checkpoint(args.checkpoint)
    model = load_backbone(checkpoint)
    arch = checkpoint.architecture
    info = {"path": str(checkpoint.path), "kind": checkpoint.kind, "model_id": checkpoint.model_id,
            "family": arch.family, "embed_dim": arch.embed_dim, "depth": arch.depth, "num_heads": arch.num_heads,
            "patch_size": arch.patch_size, "num_register_tokens": arch.num_register_tokens,
            "in_chans": arch.in_chans, "parameters": parameter_count(model), "notes": checkpoint.notes}
    if checkpoint.card:
        info["card"] = json.loads(checkpoint.card.to_json())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("path", "kind", "model_id", "family", "embed_dim", "depth", "num_heads", "patch_size",
                "num_register_tokens", "in_chans"):
        print(f"{key:20s} {info[key]}")
    print(f"{'parameters':20s} {info['parameters']:,}")
    for note in checkpoint.notes:
        print(f"{'note':20s} {note}")
    if checkpoint.card:
        print(f"{'card':20s} {checkpoint.card.name}: {checkpoint.card.description}")
    return 0


def run_embed(args: argparse.Namespace) -> int:
    from ..cache import FeatureCache
    from ..embedding import default_preprocessing, embed_volume
    from ..encoder import load_encoder
    from ..volume import read_volume

    volume = read_volume(args.volume)
    encoder = load_encoder(args.model, device=args.device, precision=args.precision)
    config = default_preprocessing(encoder)
    if args.image_size:
        config = replace(config, image_size=args.image_size)
    cache = None if args.no_cache else FeatureCache(args.cache_dir)
    progress, bar = tqdm_progress("embedding")
    started = time.perf_counter()
    with bar:
        features = embed_volume(volume, encoder, config=config, layers=args.layers, batch_size=args.batch_size,
                                progress=progress, cache=cache)
    elapsed = time.perf_counter() - started
    h, w = features.grid
    print(f"{features.num_slices} slices x {h}x{w} patches x {encoder.embed_dim} dims "
          f"from {args.volume} with {encoder.model_id} in {elapsed:.1f} s")
    if args.out:
        print(f"wrote {features.save(args.out)}")
    elif cache is not None:
        print(f"cached in {cache.root}")
    return 0



def register(commands: argparse._SubParsersAction) -> None:
    info = commands.add_parser("info", help="show a checkpoint's kind and architecture")
    info.add_argument("checkpoint", help="checkpoint file or built-in model name")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=run_info)

    embed = commands.add_parser("embed", help="compute (and cache) the features of a volume")
    embed.add_argument("volume", help="NIfTI/NRRD/MHA file or DICOM folder")
    embed.add_argument("--out", type=Path, default=None, help="also write the features to this .safetensors file")
    embed.add_argument("--layers", type=parse_layers, default=(), help="intermediate blocks to keep, e.g. 2,5,8,11")
    embed.add_argument("--image-size", type=int, default=None, help="model input size (default: the model's)")
    add_model_options(embed)
    embed.set_defaults(run=run_embed)
