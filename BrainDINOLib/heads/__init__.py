"""Heads on frozen BrainDINO features: segmentation (incl. few-shot), subject-level classification,
regression and survival, and a kNN probe; their saved form, fitting from CSV manifests, metrics and plots."""
from .card import ClassInfo, HeadCard
from .evaluation import Evaluation, evaluate, write_report
from .fewshot import FewShotResult, few_shot_segment
from .fitting import FeatureSource, FitConfig, FitResult, Manifest, fit_head
from .head import Head, load_head, save_head
from .segmentation import keep_largest_components, segment
from .subject import predict_subject, slice_tokens
from .training import TrainConfig

__all__ = ["ClassInfo", "Evaluation", "FeatureSource", "FewShotResult", "FitConfig", "FitResult", "Head", "HeadCard",
           "Manifest", "TrainConfig", "evaluate", "few_shot_segment", "fit_head", "keep_largest_components",
           "load_head", "predict_subject", "save_head", "segment", "slice_tokens", "write_report"]
