"""Cohorts: thousands of volumes embedded once, across processes, GPUs and nodes (torchrun), into a resumable
feature store that head fitting and evaluation read instead of embedding again.

`read_cohort` lists a manifest's (or folder's) images; `embed_cohort` fills a `FeatureStore` (per-volume feature
files in the cache format plus index.json); `FeatureStore.open(...).features(path)` reads them back. Importing
this package loads torch: the command line imports it only inside the commands that use it.
"""
from .items import Cohort, CohortEntry, read_cohort
from .run import CohortSummary, cohort_identity, embed_cohort, plan_run
from .store import FeatureStore, StoreIdentity, VolumeRecord

__all__ = ["Cohort", "CohortEntry", "CohortSummary", "FeatureStore", "StoreIdentity", "VolumeRecord", "cohort_identity",
           "embed_cohort", "plan_run", "read_cohort"]
