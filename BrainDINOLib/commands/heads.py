"""`braindino fit-head`, `predict`, `segment`, `evaluate` and `make-cases`: heads on frozen features."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .common import add_model_options, parse_layers, tqdm_progress

TASK_CHOICES = ("segmentation", "classification", "regression", "survival", "knn")


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _cache(args: argparse.Namespace):
    from ..cache import FeatureCache
    return None if args.no_cache else FeatureCache(args.cache_dir)


# Command-line option -> field of `TrainConfig` / `FitConfig` (an option a command lacks keeps the default).
TRAINING_OPTIONS = {"epochs": "max_epochs", "lr": "learning_rate", "batch": "batch_size", "patience": "patience",
                    "seed": "seed"}
FIT_OPTIONS = ("kind", "pooling", "hidden", "layers", "image_size", "image_columns", "label_column", "target_column",
               "time_column", "event_column", "val_fraction", "folds", "label_fraction", "seed")


def _fit_config(args: argparse.Namespace, task: str):
    """A `FitConfig` from the options this command has: manifest columns, and fitting options for fit-head."""
    from ..errors import BrainDINOError
    from ..heads import FitConfig, TrainConfig

    options = vars(args)
    class_names = None
    if options.get("classes"):
        if not args.classes.is_file():
            raise BrainDINOError(args.classes, "no such class-name file")
        class_names = [line.strip() for line in args.classes.read_text().splitlines() if line.strip()]
    training = TrainConfig(**{field: options[option] for option, field in TRAINING_OPTIONS.items()
                              if option in options})
    return FitConfig(task=task, class_names=class_names, training=training,
                     **{option: options[option] for option in FIT_OPTIONS if option in options})


def _print_scalars(title: str, metrics: dict) -> None:
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(f"{title}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scalars.items()))


def run_fit_head(args: argparse.Namespace) -> int:
    from ..encoder import load_encoder
    from ..heads import Manifest, evaluate, fit_head, save_head, write_report
    from ..heads.evaluation import Evaluation

    manifest = Manifest.read(args.manifest)
    encoder = load_encoder(args.model, device=args.device, precision=args.precision)
    config = _fit_config(args, args.task)
    cache = _cache(args)
    report = args.report or args.out.with_name(args.out.name.split(".")[0] + "_report")
    started = time.perf_counter()
    progress, bar = tqdm_progress("features", unit="case")
    with bar:
        result = fit_head(manifest, encoder, config, cache, progress=progress)
    save_head(result.head, args.out)
    print(f"fitted a {args.task} head in {time.perf_counter() - started:.1f} s; wrote {args.out}")
    fit_metrics = Evaluation(result.metrics, [])
    write_report(report, fit_metrics, result.head, result.history, stem="fit_metrics")
    for part in ("validation", "cross_validation"):
        if part in result.metrics:
            _print_scalars(part, result.metrics[part])
    if manifest.select("test") and "split" in manifest.columns:
        evaluation = evaluate(result.head, manifest, encoder, cache, split="test", columns=config)
        write_report(report, evaluation, result.head)
        _print_scalars("test", evaluation.metrics)
    print(f"report in {report}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ..encoder import load_encoder
    from ..heads import Manifest, evaluate, load_head, write_report

    head = load_head(args.head)
    manifest = Manifest.read(args.manifest)
    encoder = load_encoder(args.model, device=args.device, precision=args.precision)
    progress, bar = tqdm_progress("cases", unit="case")
    with bar:
        evaluation = evaluate(head, manifest, encoder, _cache(args), split=None if args.split == "all" else args.split,
                              columns=_fit_config(args, head.card.task), progress=progress)
    written = write_report(args.report, evaluation, head)
    _print_scalars(f"{head.card.task} ({evaluation.metrics.get('subjects', evaluation.metrics.get('cases'))} cases)",
                   evaluation.metrics)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _head_features(args: argparse.Namespace, head):
    from ..encoder import load_encoder
    from ..heads import FeatureSource

    encoder = load_encoder(args.model, device=args.device, precision=args.precision)
    return FeatureSource.for_head(head, encoder, _cache(args))


def _segmentation_output(out: Path | None, volume: str, many: bool) -> Path:
    from ..errors import BrainDINOError
    if out is None:
        raise BrainDINOError(volume, "a segmentation head writes label volumes: give --out")
    if not many:
        return out
    return out / (Path(volume).name.split(".")[0] + "_seg.nii.gz")


def run_predict(args: argparse.Namespace) -> int:
    from ..heads import load_head, predict_subject, segment
    from ..volume import write_volume

    head = load_head(args.head)
    features = _head_features(args, head)
    if head.card.task == "segmentation":
        for volume in args.volumes:
            target = _segmentation_output(args.out, volume, len(args.volumes) > 1)
            write_volume(segment(head, features(volume), cleanup=args.cleanup), target)
            print(f"wrote {target}")
        return 0
    modalities = max(1, len(head.card.modalities))
    if len(args.volumes) % modalities:
        from ..errors import BrainDINOError
        raise BrainDINOError(args.head, f"needs {modalities} volumes per subject ({', '.join(head.card.modalities)}), "
                                        f"got {len(args.volumes)}")
    results = []
    for start in range(0, len(args.volumes), modalities):
        group = args.volumes[start:start + modalities]
        results.append({"volumes": group, **predict_subject(head, [features(v) for v in group])})
    _write_predictions(results, args.out)
    return 0


def _write_predictions(results: list[dict], out: Path | None) -> None:
    """Print JSON, or write .json / .csv (probabilities flattened to `p[<class>]` columns)."""
    from ..atomic import write_text_atomic
    from ..heads.metrics import write_predictions

    if out is None:
        print(json.dumps(results, indent=2))
    elif out.suffix == ".csv":
        rows = [{"volumes": ";".join(r["volumes"]),
                 **{k: v for k, v in r.items() if k not in ("volumes", "probabilities")},
                 **{f"p[{c}]": p for c, p in r.get("probabilities", {}).items()}} for r in results]
        write_predictions(rows, out)
        print(f"wrote {out}")
    else:
        write_text_atomic(out, json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")


def run_segment(args: argparse.Namespace) -> int:
    from ..heads import load_head, segment
    from ..volume import write_volume

    head = load_head(args.head)
    features = _head_features(args, head)
    labels = segment(head, features(args.volume), cleanup=args.cleanup)
    write_volume(labels, args.out)
    present = sorted(set(int(v) for v in set(labels.array.ravel().tolist())) - {0}) if labels.array.size < 5e7 else []
    names = {c.value: c.name for c in head.card.classes}
    print(f"wrote {args.out} ({', '.join(names.get(v, str(v)) for v in present) or 'no labels found'})")
    return 0


def run_make_cases(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..synthetic import CaseConfig, make_cases

    config = replace(CaseConfig(), spacing_mm=args.spacing)
    progress, bar = tqdm_progress("cases", unit="case")
    with bar:
        manifest = make_cases(args.task, args.out, args.train, args.test, seed=args.seed, config=config,
                              sequences=args.sequences or None, progress=progress)
    print(f"wrote {args.train} training and {args.test} test {args.task} cases; manifest {manifest}")
    return 0


def _add_column_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("manifest columns")
    group.add_argument("--image-columns", type=_comma_list, default=(),
                       help="image column(s), one per modality (default: `image`, else every `image_*` column)")
    group.add_argument("--label-column", default="label", help="label volume (segmentation) or class (default: label)")
    group.add_argument("--target-column", default="target", help="regression target (default: target)")
    group.add_argument("--time-column", default="time", help="survival time (default: time)")
    group.add_argument("--event-column", default="event", help="survival event, 1 = observed (default: event)")


def register(commands: argparse._SubParsersAction) -> None:
    fit = commands.add_parser("fit-head", help="fit a head on the labelled cases of a CSV manifest")
    fit.add_argument("--task", required=True, choices=TASK_CHOICES)
    fit.add_argument("--manifest", required=True, type=Path, help="CSV: one row per case (see the README)")
    fit.add_argument("--out", required=True, type=Path, help="head file to write (.safetensors)")
    fit.add_argument("--report", type=Path, default=None, help="metrics and plots folder (default: <out>_report)")
    fit.add_argument("--kind", default="", choices=("", "linear", "decoder"), help="segmentation head (default linear)")
    fit.add_argument("--pooling", default="mean", choices=("mean", "attention"), help="subject pooling (default mean)")
    fit.add_argument("--hidden", type=int, default=256, help="subject heads: MLP width; 0 = linear (default 256)")
    fit.add_argument("--layers", type=parse_layers, default=(),
                     help="segmentation: blocks to concatenate, e.g. 2,5,8,11")
    fit.add_argument("--image-size", type=int, default=None, help="model input size (default: the model's)")
    fit.add_argument("--classes", type=Path, default=None, help="segmentation: class names by label value, one a line")
    fit.add_argument("--val-fraction", type=float, default=0.2, help="validation share for early stopping (0.2)")
    fit.add_argument("--folds", type=int, default=0, help="k-fold cross-validation estimate (0: none)")
    fit.add_argument("--label-fraction", type=float, default=1.0, help="train on this share of the labelled cases")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--epochs", type=int, default=200)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--batch", type=int, default=32, help="slices (segmentation) or subjects per step")
    fit.add_argument("--patience", type=int, default=30, help="early stopping patience in epochs")
    _add_column_options(fit)
    add_model_options(fit)
    fit.set_defaults(run=run_fit_head)

    predict = commands.add_parser("predict", help="apply a head to volumes (subject heads: prints JSON)")
    predict.add_argument("head", type=Path)
    predict.add_argument("volumes", nargs="+", help="volumes; for a multi-modal head, one per modality per subject")
    predict.add_argument("--out", type=Path, default=None,
                         help="subject heads: .json or .csv file (default: print JSON); segmentation: label file "
                              "(one volume) or folder (several)")
    predict.add_argument("--cleanup", action="store_true", help="segmentation: keep each label's largest component")
    add_model_options(predict)
    predict.set_defaults(run=run_predict)

    seg = commands.add_parser("segment", help="write the label volume a segmentation head predicts")
    seg.add_argument("head", type=Path)
    seg.add_argument("volume")
    seg.add_argument("--out", required=True, type=Path, help="label volume to write (.nii.gz, .nrrd, .mha)")
    seg.add_argument("--cleanup", action="store_true", help="keep each label's largest connected component")
    add_model_options(seg)
    seg.set_defaults(run=run_segment)

    ev = commands.add_parser("evaluate", help="metrics and plots of a head on a manifest's cases")
    ev.add_argument("head", type=Path)
    ev.add_argument("--manifest", required=True, type=Path)
    ev.add_argument("--split", default="test", help="rows to use: test (default), train, or all")
    ev.add_argument("--report", type=Path, default=Path("evaluation"), help="output folder (default: ./evaluation)")
    _add_column_options(ev)
    add_model_options(ev)
    ev.set_defaults(run=run_evaluate)

    make = commands.add_parser("make-cases", help="generate labelled cases from the real templates (+ manifest)")
    from ..synthetic import TASKS
    make.add_argument("--task", required=True, choices=TASKS)
    make.add_argument("--out", required=True, type=Path, help="folder for the cases and cases.csv")
    make.add_argument("--train", type=int, default=16, help="training cases (default 16)")
    make.add_argument("--test", type=int, default=8, help="test cases (default 8)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (default 2)")
    make.add_argument("--sequences", type=_comma_list, default=(),
                      help="sequences to render per case, e.g. T1,FLAIR (multi-modal); default per task")
    make.set_defaults(run=run_make_cases)
