"""Every head kind, in one place: importing this module imports the modules that define head kinds and predictions,
and each registers itself (`registry.py`); the registry itself names none of them."""
from . import knn, segmentation, subject  # noqa: F401
