"""The versioned model artifact: writing it, and loading it only after its SHA-256 checks out.

A model artifact is a joblib file holding a fitted scikit-learn
:class:`~sklearn.pipeline.Pipeline` (z-score standardisation, feature
selection, classifier) and the metadata needed to apply it: the ordered feature
names, the radiomics preset and its fingerprint, the unit of analysis and the
task. Its SHA-256 is recorded in the model card when it is trained;
:func:`load_model` recomputes it *before* unpickling (a pickle runs code when it
is loaded) and refuses a file that does not match.

Format version 1 artifacts written before the selectors moved to
:mod:`osteonode.classify.selectors` name them ``osteonode.classify.model.*``
in their pickle; :mod:`osteonode.classify.model` keeps those names loadable.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
from sklearn.pipeline import Pipeline

from osteonode.classify.dataset import feature_vectors, to_matrix
from osteonode.errors import OsteonodeError

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "osteonode-radiomics-model"
ARTIFACT_FORMAT_VERSION = 1


class ModelArtifactError(OsteonodeError):
    """A model artifact that must not be used: wrong hash, unreadable, or not an osteonode model.

    The worker catches it, falls back to the rule-based classification and says so.
    """


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks.

    Parameters
    ----------
    path : pathlib.Path
        The file.

    Returns
    -------
    str
        64 lower-case hex digits.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    """
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Model:
    """A loaded, hash-checked radiomics model.

    Attributes
    ----------
    pipeline : sklearn.pipeline.Pipeline
        Fitted pipeline; ``predict_proba`` column 1 is the positive class.
    feature_names : tuple of str
        Input features in column order.
    metadata : dict
        What the artifact says about itself: ``task``, ``positive_class``,
        ``negative_class``, ``unit``, ``levels``, ``preset``, ``preset_sha256``,
        ``threshold``, ``model_id``, ``synthetic``, ``provenance``.
    sha256 : str
        Hex SHA-256 of the artifact file, as checked.
    """

    pipeline: Pipeline
    feature_names: tuple[str, ...]
    metadata: dict[str, Any]
    sha256: str

    def predict(self, rows: Sequence[dict[str, Any]]) -> list[tuple[str | None, float]]:
        """Positive-class probability for one study's feature-table rows.

        Parameters
        ----------
        rows : sequence of dict
            One study's rows (:func:`osteonode.feature_table.read_feature_table`).

        Returns
        -------
        list of (level, probability)
            One entry (level None) for a study-level model, one per level for a
            vertebra-level model.

        Raises
        ------
        ValueError
            If the rows were extracted with another radiomics preset (fingerprint
            mismatch), or a level or feature the model needs is missing.
        """
        fingerprints = {str(r["preset_sha256"]) for r in rows}
        if fingerprints != {self.metadata["preset_sha256"]}:
            raise ValueError(f"features were not extracted with the model's radiomics preset "
                             f"{self.metadata['preset']!r} (fingerprint mismatch)")
        samples = feature_vectors(rows, self.metadata["unit"], self.metadata["levels"])
        probability = self.pipeline.predict_proba(to_matrix([s for _, s in samples], self.feature_names))[:, 1]
        return [(level, float(p)) for (level, _), p in zip(samples, probability)]


def save_model(pipeline: Pipeline, feature_names: Sequence[str], metadata: dict[str, Any], path: Path) -> str:
    """Write a model artifact and return its hex SHA-256.

    Parameters
    ----------
    pipeline : sklearn.pipeline.Pipeline
        Fitted pipeline.
    feature_names : sequence of str
        Input features in column order.
    metadata : dict
        See :class:`Model`.
    path : pathlib.Path
        Output file (joblib).

    Returns
    -------
    str
        Hex SHA-256 of the written file.
    """
    joblib.dump({"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_FORMAT_VERSION, "pipeline": pipeline,
                 "feature_names": list(feature_names), "metadata": metadata}, path)
    return sha256_file(path)


def load_model(path: Path, expected_sha256: str) -> Model:
    """Load a model artifact after checking its SHA-256.

    The hash is checked before the file is unpickled, so a tampered or
    corrupted file never runs.

    Parameters
    ----------
    path : pathlib.Path
        The ``.joblib`` artifact.
    expected_sha256 : str
        Hex SHA-256 from the model card or configuration (case-insensitive).

    Returns
    -------
    Model
        The model.

    Raises
    ------
    ModelArtifactError
        If the file is missing, its SHA-256 differs from ``expected_sha256``,
        or it is not an osteonode model artifact of a supported format version.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelArtifactError(f"model artifact {path} does not exist")
    actual = sha256_file(path)
    if not hmac.compare_digest(actual, expected_sha256.strip().lower()):
        raise ModelArtifactError(f"model artifact {path.name}: SHA-256 {actual} does not match the expected "
                                 f"{expected_sha256.strip().lower()}; refusing to load it (corrupted or replaced)")
    content = joblib.load(path)
    if not isinstance(content, dict) or content.get("format") != ARTIFACT_FORMAT:
        raise ModelArtifactError(f"{path.name} is not an osteonode radiomics model artifact")
    if content.get("format_version") != ARTIFACT_FORMAT_VERSION:
        raise ModelArtifactError(f"{path.name}: artifact format version {content.get('format_version')} "
                                 f"is not supported (expected {ARTIFACT_FORMAT_VERSION})")
    log.info("loaded model %s (sha256 %s...)", content["metadata"].get("model_id"), actual[:12])
    return Model(pipeline=content["pipeline"], feature_names=tuple(content["feature_names"]),
                 metadata=dict(content["metadata"]), sha256=actual)


def read_sha256_file(model_path: Path) -> str:
    """The hash recorded in ``<artifact>.sha256`` (``sha256sum`` format) beside a model artifact.

    Parameters
    ----------
    model_path : pathlib.Path
        The artifact.

    Returns
    -------
    str
        The recorded hex SHA-256.

    Raises
    ------
    ModelArtifactError
        If the file is missing or does not name the artifact.
    """
    sidecar = model_path.with_name(model_path.name + ".sha256")
    try:
        digest, name = sidecar.read_text(encoding="utf-8").split()
    except (FileNotFoundError, ValueError) as exc:
        raise ModelArtifactError(f"no valid {sidecar.name} beside the model; pass the expected SHA-256") from exc
    if name != model_path.name:
        raise ModelArtifactError(f"{sidecar.name} names {name}, not {model_path.name}")
    return digest
