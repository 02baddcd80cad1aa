"""Bone-status classification: threshold rules and trained radiomics models.

:func:`classify_bone_status` is the one entry point the pipeline calls. A
configured model is used only when its artifact passes the SHA-256 check and
its task yields a bone-status category; otherwise the configured rule gives
the status and the basis says why the model was not used.

The artifact module (scikit-learn, joblib: seconds to import, bench/README.md)
is imported only when a model is configured.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, get_args

from osteonode.classify.rules import classify_acr_vbmd, classify_l1_hu
from osteonode.config import AnalysisSettings
from osteonode.result import BoneCategory, BoneStatus, LevelResult

log = logging.getLogger(__name__)

RULES = {"pickhardt_l1_hu": classify_l1_hu, "acr_vbmd": classify_acr_vbmd}


def classify_bone_status(levels: dict[str, LevelResult], feature_rows: Sequence[dict[str, Any]],
                         settings: AnalysisSettings) -> BoneStatus:
    """Bone status of one study: the configured model if usable, else the configured rule.

    Parameters
    ----------
    levels : dict[str, LevelResult]
        Per-level measurements (HU, vBMD).
    feature_rows : sequence of dict
        The study's radiomics rows (may be empty when radiomics is off).
    settings : AnalysisSettings
        ``bone_status_rule`` and the optional ``model`` (path + sha256).

    Returns
    -------
    BoneStatus
        ``basis`` names the rule or the model; a model trained on synthetic
        data is labelled "NOT clinically valid".
    """
    status = RULES[settings.bone_status_rule](levels)
    if settings.model is None:
        return status
    from osteonode.classify.artifact import ModelArtifactError, load_model
    try:
        model = load_model(settings.model.path, settings.model.sha256)
        positive, negative = model.metadata["positive_class"], model.metadata["negative_class"]
        if {positive, negative} - set(get_args(BoneCategory)):
            raise ValueError(f"model task {model.metadata['task']!r} does not yield a bone-status category")
        probabilities = [p for _, p in model.predict(feature_rows)]
    except (ModelArtifactError, ValueError, KeyError) as exc:
        log.warning("configured model not used, rule-based default applies: %s", exc)
        return BoneStatus(category=status.category,
                          basis=f"{status.basis}; configured model not used ({exc})")
    probability = sum(probabilities) / len(probabilities)
    category = positive if probability >= float(model.metadata["threshold"]) else negative
    validity = ("NOT clinically valid: trained on synthetic data" if model.metadata.get("synthetic")
                else f"trained on: {model.metadata.get('provenance', 'unstated data')}")
    return BoneStatus(category=category,
                      basis=f"radiomics model {model.metadata['model_id']} ({positive} vs {negative}), "
                            f"p({positive}) = {probability:.2f}; {validity}; rule: {status.basis}")
