"""Survival: Cox proportional-hazards loss, concordance, median risk groups, Kaplan-Meier and log-rank.

The head predicts a log-risk per subject; it is fitted with the negative Cox partial log-likelihood
(Breslow handling of ties). Evaluation uses lifelines for the C-index, Kaplan-Meier estimates and the
log-rank test between the high- and low-risk groups split at the training median risk.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index
from torch import Tensor


def cox_partial_likelihood_loss(log_risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Negative Cox partial log-likelihood per event (Breslow ties): sum over events of
    log-risk minus log of the summed risks of everyone still at risk at that time."""
    order = torch.argsort(time, descending=True)
    log_risk, time, event = log_risk[order], time[order], event[order].float()
    at_risk = torch.logcumsumexp(log_risk, dim=0)  # everyone with time >= t_i (sorted descending)
    # Ties: everyone with the same time is at risk too; take the value at the last position of each tie group.
    _, inverse, counts = torch.unique_consecutive(time, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0) - 1
    at_risk = at_risk[last[inverse]]
    events = event.sum().clamp_min(1.0)
    return -((log_risk - at_risk) * event).sum() / events


def admissible_pairs(time: np.ndarray, event: np.ndarray) -> int:
    """Pairs the C-index can compare: an observed event and a subject known to survive longer."""
    time, event = np.asarray(time, float), np.asarray(event, bool)
    return int(sum((time > t).sum() for t in time[event]))


def c_index(time: np.ndarray, risk: np.ndarray, event: np.ndarray) -> float:
    """Harrell's concordance: higher risk should mean earlier event (lifelines expects survival scores).
    NaN when no pair of subjects can be compared (no event, or no one outlived an event)."""
    if not admissible_pairs(time, event):
        return float("nan")
    return float(concordance_index(time, -np.asarray(risk), event))


@dataclass
class RiskGroups:
    """Kaplan-Meier curves of the high- and low-risk groups and their log-rank test."""

    threshold: float
    high: np.ndarray  # bool per subject
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # group -> (times, survival probability)
    logrank_p: float
    logrank_statistic: float


def risk_groups(time: np.ndarray, event: np.ndarray, risk: np.ndarray, threshold: float) -> RiskGroups:
    """Split at `threshold` (the training median risk), fit Kaplan-Meier per group, log-rank test between them."""
    time, event, risk = np.asarray(time, float), np.asarray(event, bool), np.asarray(risk, float)
    high = risk > threshold
    curves = {}
    for name, members in (("high risk", high), ("low risk", ~high)):
        if members.any():
            fitter = KaplanMeierFitter().fit(time[members], event[members], label=name)
            frame = fitter.survival_function_
            curves[name] = (frame.index.to_numpy(float), frame.iloc[:, 0].to_numpy(float))
    if high.any() and (~high).any():
        test = logrank_test(time[high], time[~high], event[high], event[~high])
        p, statistic = float(test.p_value), float(test.test_statistic)
    else:
        p, statistic = float("nan"), float("nan")
    return RiskGroups(threshold, high, curves, p, statistic)
