"""Pickle path of the feature selectors in model artifacts of format version 1.

Artifacts trained before the selectors moved to
:mod:`osteonode.classify.selectors` refer to them as
``osteonode.classify.model.L2StabilitySelector`` and
``osteonode.classify.model.MRMRLassoSelector``; unpickling them imports this
module. New code imports from :mod:`osteonode.classify.selectors` and
:mod:`osteonode.classify.artifact`.
"""

from osteonode.classify.selectors import L2StabilitySelector, MRMRLassoSelector

__all__ = ["L2StabilitySelector", "MRMRLassoSelector"]
