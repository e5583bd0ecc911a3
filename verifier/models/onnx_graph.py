"""A very small helper for writing ONNX graphs by hand with ``onnx.helper``.

Our converters describe an architecture layer by layer and need only three things: add a node and get
its output name, add a constant tensor, and finish the model. Names are generated so that callers never
collide, and node names carry a readable prefix (the module path in the original state dict).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class GraphBuilder:
    def __init__(self, name: str) -> None:
        self.name = name
        self._nodes: list[onnx.NodeProto] = []
        self._initializers: list[onnx.TensorProto] = []
        self._inputs: list[onnx.ValueInfoProto] = []
        self._outputs: list[onnx.ValueInfoProto] = []
        self._counter = 0

    def _fresh(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}__{self._counter}"

    def input(self, name: str, shape: Sequence[int | str | None], dtype: int = TensorProto.FLOAT) -> str:
        self._inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def output(self, value: str, name: str, shape: Sequence[int | str | None]) -> str:
        self.op("Identity", [value], prefix=name, output_name=name)
        self._outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    def const(self, array: np.ndarray | float | int | Sequence[int], prefix: str = "const") -> str:
        """Add a constant (an initializer). Python ints and int lists become int64, floats float32."""
        if isinstance(array, np.ndarray):
            value = array
        elif isinstance(array, float):
            value = np.asarray(array, dtype=np.float32)
        else:
            value = np.asarray(array, dtype=np.int64)
        if value.dtype == np.float64:
            value = value.astype(np.float32)
        name = self._fresh(prefix)
        self._initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        prefix: str = "",
        outputs: int = 1,
        output_name: str | None = None,
        **attrs: Any,
    ) -> str | list[str]:
        """Add one node; return its output name (or names, when ``outputs`` > 1)."""
        base = prefix or op_type.lower()
        if output_name is not None:
            names = [output_name]
        else:
            names = [self._fresh(f"{base}/{op_type}") for _ in range(outputs)]
        self._nodes.append(
            helper.make_node(op_type, list(inputs), names, name=self._fresh(f"{base}/{op_type}"), **attrs)
        )
        return names[0] if outputs == 1 else names

    def build(self, doc: str = "", metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(
            self._nodes, self.name, self._inputs, self._outputs, initializer=self._initializers
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="vpmon",
            doc_string=doc,
        )
        model.ir_version = 8  # readable by every onnxruntime >= 1.14
        for key, value in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model, full_check=True)
        return model
