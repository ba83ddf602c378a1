"""The engine-free PCA projection: what the pca stage fitted, as numpy arrays (no Spark, no JVM).

Spark's PCA projects without centring; with standardisation, Spark's StandardScaler first subtracts
the Training mean and multiplies by 1/std (0 where a feature is constant). The artifact stores exactly
that, so `project` gives Spark's vectors, for a whole table (the pca stage) or for one photo (the app).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fruits.core import tables
from fruits.core.storage import Storage, atomic_output, file_digest


@dataclass(frozen=True)
class Projection:
    components: np.ndarray  # (dimension, k): the first k principal components, as columns
    shift: np.ndarray  # (dimension,): subtracted first (the Training mean if standardised, else zeros)
    factor: np.ndarray  # (dimension,): multiplied next (1/std if standardised, else ones)
    explained_variance: np.ndarray  # (k,): share of the variance of each kept component

    @property
    def k(self) -> int:
        return self.components.shape[1]

    @property
    def dimension(self) -> int:
        return self.components.shape[0]

    def project(self, features: np.ndarray) -> np.ndarray:
        """(n, dimension) features -> (n, k) PCA vectors, float64."""
        features = np.asarray(features, dtype=np.float64)
        if features.shape[-1] != self.dimension:
            raise ValueError(f"features have {features.shape[-1]} dimensions, the PCA expects {self.dimension}")
        return ((features - self.shift) * self.factor) @ self.components


def save_projection(projection: Projection, path: str | Path) -> Path:
    """Write atomically (.npz): an interrupted write never leaves a half artifact."""
    with atomic_output(path) as partial, open(partial, "wb") as stream:  # a stream: savez adds no suffix
        np.savez(stream, components=projection.components, shift=projection.shift, factor=projection.factor,
                 explained_variance=projection.explained_variance)
    return Path(path)


def load_projection(path: str | Path) -> Projection:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"PCA projection {path} not found: run the pca stage first (dvc repro)")
    return read_projection(path.read_bytes())


def read_projection(content: bytes) -> Projection:
    """The projection from a file's bytes (the app checksums the same bytes it loads)."""
    with np.load(io.BytesIO(content)) as arrays:
        return Projection(arrays["components"], arrays["shift"], arrays["factor"], arrays["explained_variance"])


def checked_projection_sha256(vectors: str, projection: str | Path, store: Storage) -> str:
    """The checksum of the projection file (env.paths.pca_projection), checked to be the one the
    committed PCA vectors (env.paths.pca_vectors) were made with (else a pca run was killed between
    writing the two: re-run pca)."""
    record = tables.commit_record(vectors, store) or {}
    path = Path(projection)
    actual = file_digest(path) if path.exists() else None
    if actual is None or record.get("projection_sha256", actual) != actual:
        raise tables.NoTable(f"env.paths.pca_projection={path} is not the projection the committed "
                             "env.paths.pca_vectors were made with (an interrupted pca run?): re-run the pca stage")
    return actual
