"""GE2E speaker encoder (Wan et al., "Generalized End-to-End Loss for Speaker Verification", ICASSP 2018,
arXiv:1710.10467) as trained and shipped by Resemblyzer, written as an ONNX graph from its state dict,
plus its front end in plain numpy. No torch, no librosa.

The network (Resemblyzer's ``VoiceEncoder``)::

    mels (batch, frames, 40) → LSTM 40→256 → LSTM 256→256 → LSTM 256→256 → final hidden state of the
    last layer (batch, 256) → Linear 256→256 → ReLU → divide by the L2 norm → embedding (batch, 256)

The ReLU comes *before* the normalisation, so every embedding component is ≥ 0 and the cosine of two
embeddings is never negative: scores live in [0, 1], not [-1, 1].

The front end is a power (not log) mel spectrogram: 25 ms periodic Hann window, 10 ms hop, centred frames
with zero padding, 40 Slaney-scale mel bands with Slaney area normalisation — exactly what
``librosa.feature.melspectrogram(y, sr=16000, n_fft=400, hop_length=160, n_mels=40)`` computes with
librosa's defaults (>= 0.10; earlier releases padded by reflection, which changes only the first and last
two frames).
"""

from __future__ import annotations

import numpy as np
import onnx

from verifier.errors import AudioError, ModelError
from verifier.models.onnx_graph import GraphBuilder

# --- the model's facts (Resemblyzer's hparams.py) -------------------------------------------------------
SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window, also the FFT size (no zero padding inside a frame)
HOP_LENGTH = 160  # 10 ms
N_MELS = 40
HIDDEN_SIZE = 256
NUM_LAYERS = 3
EMBEDDING_DIM = 256
# Window rules: the encoder was trained on 1.6 s partials; an utterance is cut into 160-frame partials,
# 1.3 partials per second (so they overlap), the last one kept only if the audio covers at least 75 % of
# it; the utterance embedding is the L2-normalised mean of the partial embeddings.
PARTIAL_FRAMES = 160
PARTIAL_RATE = 1.3
MIN_COVERAGE = 0.75

# Keeps the final division finite when the ReLU zeroes a whole embedding (the reference returns NaN there).
_NORM_FLOOR = 1e-12


# --- front end ------------------------------------------------------------------------------------------
def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 mel bands per 200 Hz) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3.0)
    log_step = np.log(6.4) / 27.0  # 27 bands per factor 6.4 in frequency above 1 kHz
    return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / log_step, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    log_step = np.log(6.4) / 27.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(log_step * (mel - 15.0)), mel * (200.0 / 3.0))


def _mel_filterbank() -> np.ndarray:
    """(N_MELS, N_FFT // 2 + 1) triangles evenly spaced in Slaney mel from 0 Hz to Nyquist, each scaled to
    unit area (2 / bandwidth in Hz), so a band's output does not grow with its width."""
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (fft_hz - lower) / (centre - lower)
    falling = (upper - fft_hz) / (upper - centre)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    return triangles * (2.0 / (upper - lower))


# Stored transposed and contiguous: (201, 40), the right-hand side of the per-frame matmul.
_MEL_BASIS_T = np.ascontiguousarray(_mel_filterbank().T)
# Periodic Hann (the DFT-even window an STFT wants): the symmetric one of length N+1 without its last point.
_WINDOW = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)


def ge2e_mel(samples: np.ndarray) -> np.ndarray:
    """Power mel spectrogram of 16 kHz mono audio in [-1, 1]: (frames, 40) float32, frames = 1 + n // 160.

    Frame ``t`` is centred on sample ``t * 160``; the signal is zero-padded by 200 samples on each side.
    Computed in float64 and rounded once at the end.
    """
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise AudioError(f"ge2e_mel expects mono audio as a 1-d array, got shape {samples.shape}")
    padded = np.pad(samples.astype(np.float64), N_FFT // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
    spectrum = np.fft.rfft(frames * _WINDOW, axis=1)
    power = spectrum.real**2 + spectrum.imag**2
    return (power @ _MEL_BASIS_T).astype(np.float32)


# --- network --------------------------------------------------------------------------------------------
def _weight(state: dict[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = np.asarray(state[key], dtype=np.float32)
    except KeyError:
        raise ModelError(
            f"the GE2E weights have no tensor {key!r}: is this Resemblyzer's model_state?"
        ) from None
    if array.shape != shape:
        raise ModelError(f"GE2E tensor {key!r} has shape {array.shape}, expected {shape}")
    return array


def _onnx_gates(torch_gates: np.ndarray) -> np.ndarray:
    """Reorder the four gate blocks along axis 0 from PyTorch's (i, f, g, o) to ONNX's (i, o, f, c)."""
    i, f, g, o = np.split(torch_gates, 4, axis=0)
    return np.concatenate([i, o, f, g], axis=0)


def build_ge2e_onnx(state: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The encoder as an ONNX model: input ``mels`` (batch, frames, 40), output ``embedding`` (batch, 256).

    ``state`` is Resemblyzer's ``model_state`` (its ``similarity_*`` training-loss scalars are ignored).
    Any number of frames works; the model was trained on 160.
    """
    g = GraphBuilder("ge2e")
    hidden = HIDDEN_SIZE
    mels = g.input("mels", ["batch", "frames", N_MELS])
    # Time-major (seq, batch, features) for the LSTM: onnxruntime refuses its batch-first layout=1.
    x = g.op("Transpose", [mels], prefix="lstm", perm=[1, 0, 2])
    for layer in range(NUM_LAYERS):
        size_in = N_MELS if layer == 0 else hidden
        w = _onnx_gates(_weight(state, f"lstm.weight_ih_l{layer}", (4 * hidden, size_in)))
        r = _onnx_gates(_weight(state, f"lstm.weight_hh_l{layer}", (4 * hidden, hidden)))
        # PyTorch adds two biases (input and recurrent); ONNX takes both, concatenated, in its gate order.
        b = np.concatenate(
            [
                _onnx_gates(_weight(state, f"lstm.bias_ih_l{layer}", (4 * hidden,))),
                _onnx_gates(_weight(state, f"lstm.bias_hh_l{layer}", (4 * hidden,))),
            ]
        )
        inputs = [x, g.const(w[None], f"lstm.l{layer}.W"), g.const(r[None], f"lstm.l{layer}.R")]
        inputs.append(g.const(b[None], f"lstm.l{layer}.B"))
        # Outputs: Y (seq, 1 direction, batch, hidden) feeds the next layer; Y_h (1, batch, hidden) is the
        # final hidden state, of which only the last layer's is used.
        y, y_h = g.op("LSTM", inputs, prefix=f"lstm.l{layer}", outputs=2, hidden_size=hidden)
        if layer < NUM_LAYERS - 1:
            x = g.op("Squeeze", [y, g.const([1])], prefix=f"lstm.l{layer}")
        else:
            # PyTorch's hidden[-1]: the final hidden state of the last layer.
            last = g.op("Squeeze", [y_h, g.const([0])], prefix=f"lstm.l{layer}")
    linear = g.op(
        "Gemm",
        [
            last,
            g.const(_weight(state, "linear.weight", (EMBEDDING_DIM, hidden)), "linear.weight"),
            g.const(_weight(state, "linear.bias", (EMBEDDING_DIM,)), "linear.bias"),
        ],
        prefix="linear",
        transB=1,
    )
    positive = g.op("Relu", [linear], prefix="relu")
    norm = g.op("ReduceL2", [positive], prefix="l2norm", axes=[1], keepdims=1)
    norm = g.op("Max", [norm, g.const(np.array(_NORM_FLOOR, np.float32), "l2norm.floor")], prefix="l2norm")
    embedding = g.op("Div", [positive, norm], prefix="l2norm")
    g.output(embedding, "embedding", ["batch", EMBEDDING_DIM])
    return g.build(
        doc="GE2E speaker encoder (Resemblyzer), converted by vpmon from the original state dict.",
        metadata={"frontend": "ge2e_mel", "embedding_dim": str(EMBEDDING_DIM)},
    )
