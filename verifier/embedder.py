"""Speaker embeddings on onnxruntime, many windows per call.

The models have no padding mask (CAM++ pools statistics over every frame it is given), so a batch may
only hold inputs of one length. Windows are therefore cropped to a multiple of ``bucket_frames``
(10 frames = 0.1 s by default, at most 90 ms of audio lost) and windows of equal length run together.
GE2E-style models take fixed-length partials, which batch trivially.

onnxruntime releases the GIL while it runs, so callers may use an Embedder from worker threads.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from verifier.errors import AudioError, ModelError
from verifier.features import compute_features
from verifier.models.provision import Progress, ensure_model
from verifier.models.registry import get_spec
from verifier.models.spec import ModelSpec


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def partial_slices(n_frames: int, partial_frames: int, frame_step: int, min_coverage: float) -> list[slice]:
    """Overlapping fixed-length partials covering ``n_frames`` frames (GE2E's inference scheme).

    The last partial may run past the end (the caller pads); it is dropped when it would cover less
    than ``min_coverage`` of its length, unless it is the only one.
    """
    starts = list(range(0, max(1, n_frames - partial_frames + frame_step + 1), frame_step))
    slices = [slice(start, start + partial_frames) for start in starts]
    coverage = (n_frames - slices[-1].start) / partial_frames
    if coverage < min_coverage and len(slices) > 1:
        slices.pop()
    return slices


class Embedder:
    def __init__(
        self,
        spec: ModelSpec,
        onnx_path: Path,
        *,
        threads: int = 1,
        max_batch: int = 32,
        bucket_frames: int = 10,
    ) -> None:
        self.spec = spec
        self.max_batch = max_batch
        self.bucket_frames = bucket_frames
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"onnxruntime cannot load {onnx_path}: {exc}") from None
        self.min_samples = int(spec.windows.min_seconds * spec.sample_rate)
        self.max_samples = int(spec.windows.max_seconds * spec.sample_rate)

    @classmethod
    def load(
        cls, model: str | None = None, *, home: Path | None = None, progress: Progress | None = None, **kwargs
    ) -> Embedder:
        """The named (or default) model, fetched and converted on first use."""
        spec = get_spec(model)
        return cls(spec, ensure_model(spec, home, progress), **kwargs)

    @property
    def model_id(self) -> str:
        return self.spec.id

    @property
    def dim(self) -> int:
        return self.spec.embedding_dim

    # --- features -----------------------------------------------------------------------------
    def _model_inputs(self, samples: np.ndarray) -> list[np.ndarray]:
        """One window → the feature matrices the network sees (one, or several partials)."""
        rules = self.spec.windows
        hop = int(self.spec.sample_rate * self.spec.frontend.frame_shift_ms / 1000)
        if rules.partial_frames is None:
            # Crop the audio, not the features, so that mean normalisation sees exactly what the model does.
            width = int(self.spec.sample_rate * self.spec.frontend.frame_length_ms / 1000)
            keep = self._kept_frames(len(samples))
            return [compute_features(samples[: width + (keep - 1) * hop], self.spec.frontend)]
        n_frames = len(samples) // hop + 1
        step = max(1, round(self.spec.frontend.frames_per_second / rules.partial_rate))
        slices = partial_slices(n_frames, rules.partial_frames, step, rules.min_coverage)
        needed = slices[-1].stop * hop
        if needed > len(samples):  # pad with silence so the last partial is complete
            samples = np.pad(samples, (0, needed - len(samples)))
        features = compute_features(samples, self.spec.frontend, self.spec.sample_rate)
        return [features[s] for s in slices]

    def _kept_frames(self, n_samples: int) -> int:
        """Feature frames of a window of ``n_samples`` after cropping to a multiple of ``bucket_frames``."""
        hop = int(self.spec.sample_rate * self.spec.frontend.frame_shift_ms / 1000)
        width = int(self.spec.sample_rate * self.spec.frontend.frame_length_ms / 1000)
        frames = 1 + (n_samples - width) // hop
        return max(self.bucket_frames, frames - frames % self.bucket_frames)

    def batch_key(self, n_samples: int) -> int:
        """Windows with equal keys give network inputs of one length, so they run in one onnxruntime call
        (the network frames of the window, or of its first piece when it is cut; 0 for models of fixed
        partials, whose windows all batch together)."""
        if self.spec.windows.partial_frames is not None:
            return 0
        if n_samples > self.max_samples:  # cut into near-equal pieces (_pieces); the first is the longest
            n_samples = math.ceil(n_samples / math.ceil(n_samples / self.max_samples))
        return self._kept_frames(n_samples)

    def _pieces(self, samples: np.ndarray) -> list[np.ndarray]:
        """Audio longer than the model's maximum is cut into near-equal pieces."""
        if len(samples) <= self.max_samples:
            return [samples]
        count = -(-len(samples) // self.max_samples)
        return list(np.array_split(samples, count))

    # --- inference ----------------------------------------------------------------------------
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Raw network output for a (batch, frames, bins) array."""
        return self.session.run([self.spec.output_name], {self.spec.input_name: batch})[0]

    def embed_batch(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised embeddings (n, dim), one per window of 16 kHz float samples, in input order."""
        inputs: list[np.ndarray] = []
        owner: list[int] = []
        for index, samples in enumerate(windows):
            if len(samples) < self.min_samples:
                raise AudioError(
                    f"a {len(samples) / self.spec.sample_rate:.2f} s window is shorter than the "
                    f"{self.spec.windows.min_seconds} s that {self.spec.id} needs"
                )
            for piece in self._pieces(np.asarray(samples, dtype=np.float32)):
                for matrix in self._model_inputs(piece):
                    inputs.append(matrix)
                    owner.append(index)
        outputs = self._run_bucketed(inputs)
        weights = np.array([len(m) for m in inputs], dtype=np.float32)
        combined = np.zeros((len(windows), self.dim), dtype=np.float32)
        # Several pieces or partials of one window: average their normalised embeddings.
        np.add.at(combined, np.array(owner), l2_normalise(outputs) * weights[:, None])
        return l2_normalise(combined)

    def _run_bucketed(self, inputs: list[np.ndarray]) -> np.ndarray:
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, matrix in enumerate(inputs):
            by_length[len(matrix)].append(index)
        outputs = np.zeros((len(inputs), self.dim), dtype=np.float32)
        for indices in by_length.values():
            for start in range(0, len(indices), self.max_batch):
                chunk = indices[start : start + self.max_batch]
                outputs[chunk] = self.run(np.stack([inputs[i] for i in chunk]))
        return outputs
