"""Heads on frozen BrainDINO features: segmentation (incl. few-shot), subject-level classification,
regression and survival, and a kNN probe; their saved form, fitting from CSV manifests, metrics and plots."""
from .card import ClassInfo, HeadCard
from .fewshot import FewShotResult, few_shot_segment
from .head import Head, load_head, save_head
from .segmentation import keep_largest_components, segment

__all__ = ["ClassInfo", "FewShotResult", "Head", "HeadCard", "few_shot_segment", "keep_largest_components",
           "load_head", "save_head", "segment"]
