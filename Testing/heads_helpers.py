"""Shared pieces of the head tests: small generated cohorts (3 mm, mild nuisance) and a feature cache.

The encoder is the tiny fixture checkpoint, whose weights are random: its features carry only what random
projections of the image keep, so the tests assert learnability clearly above chance, not clinical accuracy.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path


from BrainDINOLib.resolution import ResolutionPolicy
from BrainDINOLib.session import FeatureSession
from BrainDINOLib.synthetic import CaseConfig, make_cases

# 7 x 7 patches on every slice with the patch-16 fixture: cheap, enough for subject tasks.
SUBJECT_RESOLUTION = ResolutionPolicy(image_size=112, upsampling="bilinear")
# Milder nuisance than the defaults, and survival with a steeper hazard and little censoring, so that the
# few dozen cases a test can afford show the effect clearly.
TEST_CASES = replace(CaseConfig(), spacing_mm=3.0, bias=0.1, contrast_jitter=0.03, hazard_beta=2.0,
                     max_censoring=100.0)


def make_cohort(root: Path, task: str, train: int, test: int, **kwargs) -> Path:
    """Generate (once per session folder) a cohort; returns its manifest."""
    manifest = root / task / "cases.csv"
    if not manifest.exists():
        make_cases(task, root / task, train, test, seed=1, config=TEST_CASES, **kwargs)
    return manifest




def heads_session(encoder, cache=None, policy: ResolutionPolicy = SUBJECT_RESOLUTION) -> FeatureSession:
    return FeatureSession.for_encoder(encoder, policy, cache)
