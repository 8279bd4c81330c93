"""`braindino fit-head`, `predict`, `segment`, `evaluate` and `make-cases`: heads on frozen features."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

from ..errors import BrainDINOError
from ..heads.config import FitConfig, HeadTrainingConfig
from ..heads.tasks import SEGMENTATION, SEGMENTATION_KINDS, TASKS
from .common import (add_model_options, comma_list, declare_files, float_between, int_between, open_session,
                     parse_layers, tqdm_progress)

TRAINING = "training."  # options that set a field of `FitConfig.training` have the destination `training.<field>`
REPORT_MARKERS = ("metrics.json", "fit_metrics.json")  # what makes a folder an earlier BrainDINO report


def head_path(text: str) -> Path:
    """A head file to write: checked before fitting, not after."""
    if not text.endswith(".safetensors"):
        raise argparse.ArgumentTypeError(f"{text}: a head is saved as a .safetensors file")
    return Path(text)


def _fields_set(options: dict, config_class: type, prefix: str = "") -> dict:
    """The fields of `config_class` that the command's options set: each option's destination is `<prefix><field>`
    (its default read from the dataclass), so options and fields are matched by name, never by a table."""
    return {f.name: options[prefix + f.name] for f in fields(config_class) if prefix + f.name in options}


def _fit_config(args: argparse.Namespace, task: str) -> FitConfig:
    """A `FitConfig` from the options this command has: manifest columns, and fitting options for fit-head (a field
    without an option keeps the dataclass default)."""
    from ..manifest import read_utf8

    options = {name: value for name, value in vars(args).items() if name != "task"}
    class_names = None
    if options.get("classes"):
        if not args.classes.is_file():
            raise BrainDINOError(args.classes, "no such class-name file")
        class_names = [line.strip() for line in read_utf8(args.classes).splitlines() if line.strip()]
    training = _fields_set(options, HeadTrainingConfig, TRAINING)
    if "seed" in options:  # one --seed seeds both the splits and the training
        training["seed"] = options["seed"]
    return FitConfig(**{**_fields_set(options, FitConfig), "task": task, "class_names": class_names,
                        "training": HeadTrainingConfig(**training)})


def _print_scalars(title: str, metrics: dict) -> None:
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(f"{title}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scalars.items()))


def _report_folder(path: Path) -> Path:
    """A folder for a report: new, empty, or an earlier BrainDINO report (whose files are replaced). A folder of
    other files is refused, so that a report never lands among (or over) unrelated files."""

    if path.exists() and not path.is_dir():
        raise BrainDINOError(path, "exists and is not a folder; give a folder for the report")
    if path.is_dir() and any(path.iterdir()) and not any((path / name).is_file() for name in REPORT_MARKERS):
        raise BrainDINOError(path, "is a folder of other files, not an earlier BrainDINO report; give a new or "
                                   "empty folder for the report")
    return path


def _manifest_inputs(manifest, outputs: list[Path]) -> None:
    """Refuse outputs that would replace an image, label volume or other file named in the manifest."""
    from ..atomic import refuse_output_over_input

    listed = [manifest.resolve(value) for row in manifest.rows for value in row.values() if value]
    refuse_output_over_input(outputs, [manifest.path, *[path for path in listed if path.is_file()]])


def _feature_store(args: argparse.Namespace):
    """The feature store of `--store` (opened, and so checked, before the model is loaded), or None."""
    if args.store is None:
        return None
    from ..cohort import FeatureStore

    return FeatureStore.open(args.store)


def run_fit_head(args: argparse.Namespace) -> int:
    """Check everything cheap first; write the head and its report only once fitting and testing succeeded."""
    from ..manifest import Manifest

    manifest = Manifest.read(args.manifest)
    report = _report_folder(args.report or args.out.with_name(args.out.name.split(".")[0] + "_report"))
    _manifest_inputs(manifest, [args.out, report])

    from ..heads import Evaluation, evaluate, fit_head, save_head, write_report
    from ..heads.cases import check_manifest

    config = _fit_config(args, args.task)
    check_manifest(manifest, config)  # before the model is loaded
    store = _feature_store(args)
    session = open_session(args, store.identity.policy if store else None)
    started = time.perf_counter()
    progress, bar = tqdm_progress("features", unit="case")
    with bar:
        result = fit_head(manifest, session, config, progress=progress, store=store)
    seconds = time.perf_counter() - started
    test = None
    if manifest.select("test") and "split" in manifest.columns:
        test = evaluate(result.head, manifest, session, split="test", columns=config, store=store)
    save_head(result.head, args.out)
    print(f"fitted a {args.task} head in {seconds:.1f} s; wrote {args.out}")
    write_report(report, Evaluation(result.metrics, []), result.head, result.history, stem="fit_metrics")
    for part in ("validation", "cross_validation"):
        if part in result.metrics:
            _print_scalars(part, result.metrics[part])
    if test is not None:
        write_report(report, test, result.head)
        _print_scalars("test", test.metrics)
    print(f"report in {report}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ..manifest import Manifest

    manifest = Manifest.read(args.manifest)
    report = _report_folder(args.report)
    _manifest_inputs(manifest, [report])

    from ..heads import evaluate, load_head, write_report
    from ..heads.cases import evaluation_rows

    head = load_head(args.head)
    split, columns = None if args.split == "all" else args.split, _fit_config(args, head.card.task)
    evaluation_rows(head.card, manifest, split, columns)  # before the model is loaded
    store = _feature_store(args)
    session = open_session(args, store.identity.policy if store else None)
    progress, bar = tqdm_progress("cases", unit="case")
    with bar:
        evaluation = evaluate(head, manifest, session, split=split, columns=columns, progress=progress, store=store)
    written = write_report(report, evaluation, head)
    _print_scalars(f"{head.card.task} ({evaluation.metrics.get('subjects', evaluation.metrics.get('cases'))} cases)",
                   evaluation.metrics)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _head_features(args: argparse.Namespace, head):
    from ..heads import FeatureSource

    return FeatureSource.for_head(head, open_session(args))


def _segmentation_output(out: Path | None, volume: str, many: bool) -> Path:
    if out is None:
        raise BrainDINOError(volume, "a segmentation head writes label volumes: give --out")
    if not many:
        return out
    return out / (Path(volume).name.split(".")[0] + "_seg.nii.gz")


def run_predict(args: argparse.Namespace) -> int:
    from ..heads import load_head, predict_subject, segment
    from ..volume import write_volume

    head = load_head(args.head)
    modalities = max(1, len(head.card.modalities))
    if head.card.task != SEGMENTATION and len(args.volumes) % modalities:
        raise BrainDINOError(args.head, f"needs {modalities} volumes per subject ({', '.join(head.card.modalities)}), "
                                        f"got {len(args.volumes)}")
    features = _head_features(args, head)
    if head.card.task == SEGMENTATION:
        for volume in args.volumes:
            target = _segmentation_output(args.out, volume, len(args.volumes) > 1)
            write_volume(segment(head, features(volume), cleanup=args.cleanup), target)
            print(f"wrote {target}")
        return 0
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
    if head.card.task != SEGMENTATION:
        raise BrainDINOError(args.head, f"is a {head.card.task} head; segment needs a segmentation head (use predict)")
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


def _add_store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, default=None,
                        help="read the features from this store (made by embed-cohort) instead of embedding; it must "
                             "hold this --model and the blocks the head reads (resolution: the store's)")


def _add_column_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("manifest columns")
    group.add_argument("--image-columns", type=comma_list, default=FitConfig.image_columns,
                       help="image column(s), one per modality (default: `image`, else every `image_*` column)")
    group.add_argument("--label-column", default=FitConfig.label_column,
                       help="label volume (segmentation) or class (default: %(default)s)")
    group.add_argument("--target-column", default=FitConfig.target_column, help="regression target (default: "
                                                                                 "%(default)s)")
    group.add_argument("--time-column", default=FitConfig.time_column, help="survival time (default: %(default)s)")
    group.add_argument("--event-column", default=FitConfig.event_column,
                       help="survival event, 1 = observed (default: %(default)s)")


def register(commands: argparse._SubParsersAction) -> None:
    fit = commands.add_parser("fit-head", help="fit a head on the labelled cases of a CSV manifest")
    fit.add_argument("--task", required=True, choices=TASKS)
    fit.add_argument("--manifest", required=True, type=Path, help="CSV: one row per case (see the README)")
    fit.add_argument("--out", required=True, type=head_path, help="head file to write (.safetensors)")
    fit.add_argument("--report", type=Path, default=None, help="metrics and plots folder (default: <out>_report)")
    fit.add_argument("--kind", default=FitConfig.kind, choices=("", *SEGMENTATION_KINDS),
                     help="segmentation head (default linear)")
    fit.add_argument("--pooling", default=FitConfig.pooling, choices=("mean", "attention"),
                     help="subject pooling (default %(default)s)")
    fit.add_argument("--hidden", type=int_between(0), default=FitConfig.hidden,
                     help="subject heads: MLP width; 0 = linear (default %(default)s)")
    fit.add_argument("--layers", type=parse_layers, default=FitConfig.layers,
                     help="segmentation: blocks to concatenate, e.g. 2,5,8,11 (default: four evenly spaced blocks "
                          "ending with the last, as the Slicer module uses)")
    fit.add_argument("--classes", type=Path, default=None, help="segmentation: class names by label value, one a line")
    fit.add_argument("--val-fraction", type=float_between(0.0, 0.9), default=FitConfig.val_fraction,
                     help="validation share for early stopping (%(default)s)")
    fit.add_argument("--folds", type=int_between(0), default=FitConfig.folds,
                     help="k-fold cross-validation estimate (0: none)")
    fit.add_argument("--label-fraction", type=float_between(0.0, 1.0), default=FitConfig.label_fraction,
                     help="train on this share of the labelled cases")
    fit.add_argument("--seed", type=int, default=FitConfig.seed)
    training = fit.add_argument_group("training (each option sets the field of HeadTrainingConfig in brackets)")
    training.add_argument("--epochs", dest=TRAINING + "max_epochs", metavar="EPOCHS", type=int_between(1),
                          default=HeadTrainingConfig.max_epochs, help="at most (max_epochs, default %(default)s)")
    training.add_argument("--lr", dest=TRAINING + "learning_rate", metavar="LR", type=float_between(0.0, 10.0),
                          default=HeadTrainingConfig.learning_rate,
                          help="AdamW learning rate (learning_rate, default %(default)s)")
    training.add_argument("--batch", dest=TRAINING + "batch_size", metavar="BATCH", type=int_between(1),
                          default=HeadTrainingConfig.batch_size,
                          help="slices (segmentation) or subjects per step (batch_size, default %(default)s)")
    training.add_argument("--patience", dest=TRAINING + "patience", metavar="PATIENCE", type=int_between(1),
                          default=HeadTrainingConfig.patience,
                          help="early stopping patience in epochs (patience, default %(default)s)")
    _add_column_options(fit)
    _add_store_option(fit)
    add_model_options(fit)
    fit.set_defaults(run=run_fit_head)
    declare_files(fit, inputs={"manifest": "manifest file", "classes": "class-name file", "store": "feature store"},
                  outputs={"out": "file", "report": "folder"})

    predict = commands.add_parser("predict", help="apply a head to volumes (subject heads: prints JSON)")
    predict.add_argument("head", type=Path)
    predict.add_argument("volumes", nargs="+", help="volumes; for a multi-modal head, one per modality per subject")
    predict.add_argument("--out", type=Path, default=None,
                         help="subject heads: .json or .csv file (default: print JSON); segmentation: label file "
                              "(one volume) or folder (several)")
    predict.add_argument("--cleanup", action="store_true", help="segmentation: keep each label's largest component")
    add_model_options(predict)
    predict.set_defaults(run=run_predict)
    declare_files(predict, inputs={"head": "head file", "volumes": "file or folder"}, outputs={"out": "file or folder"})

    seg = commands.add_parser("segment", help="write the label volume a segmentation head predicts")
    seg.add_argument("head", type=Path)
    seg.add_argument("volume")
    seg.add_argument("--out", required=True, type=Path, help="label volume to write (.nii.gz, .nrrd, .mha)")
    seg.add_argument("--cleanup", action="store_true", help="keep each label's largest connected component")
    add_model_options(seg)
    seg.set_defaults(run=run_segment)
    declare_files(seg, inputs={"head": "head file", "volume": "file or folder"}, outputs={"out": "file"})

    ev = commands.add_parser("evaluate", help="metrics and plots of a head on a manifest's cases")
    ev.add_argument("head", type=Path)
    ev.add_argument("--manifest", required=True, type=Path)
    ev.add_argument("--split", default="test", help="rows to use: test (default), train, or all")
    ev.add_argument("--report", type=Path, default=Path("evaluation"), help="output folder (default: ./evaluation)")
    _add_column_options(ev)
    _add_store_option(ev)
    add_model_options(ev)
    ev.set_defaults(run=run_evaluate)
    declare_files(ev, inputs={"head": "head file", "manifest": "manifest file", "store": "feature store"},
                  outputs={"report": "folder"})

    make = commands.add_parser("make-cases", help="generate labelled cases from the real templates (+ manifest)")
    # Checked by make_cases (importing the generator here would delay every command by its scipy import).
    make.add_argument("--task", required=True,
                      help="tissue, lobes, aal, lesion, sequence, atrophy or survival (see the README)")
    make.add_argument("--out", required=True, type=Path, help="folder for the cases and cases.csv")
    make.add_argument("--train", type=int_between(0), default=16, help="training cases (default 16)")
    make.add_argument("--test", type=int_between(0), default=8, help="test cases (default 8)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--spacing", type=float_between(0.5, 10.0), default=2.0, help="voxel size in mm (default 2)")
    make.add_argument("--sequences", type=comma_list, default=(),
                      help="sequences to render per case, e.g. T1,FLAIR (multi-modal); default per task")
    make.set_defaults(run=run_make_cases)
    declare_files(make, outputs={"out": "folder"})
