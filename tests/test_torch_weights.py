"""The restricted checkpoint loader: exact parity with torch.load, and refusal of anything else.

Checkpoints are made three ways: the real CAM++ and GE2E files, files written by torch.save (both
formats, with views, offsets and strides), and files written opcode by opcode here, so the refusal and
bounds tests need neither torch nor the real weights.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.helpers import reference_module
from verifier.errors import ModelError
from verifier.models.provision import weights_path
from verifier.models.registry import get_spec
from verifier.models.torch_weights import load_state_dict


def _torch() -> ModuleType:
    return reference_module("torch", "torch==2.13.0")


def _weights(model: str) -> Path:
    return weights_path(get_spec(model))


# --- checkpoints written opcode by opcode (pickle protocol 2, text forms where they exist) --------------
def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _str(text: str) -> bytes:
    return f"V{text}\n".encode()


def _int(value: int) -> bytes:
    return f"I{value}\n".encode()


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _call(function: bytes, *args: bytes) -> bytes:
    return function + _tuple(*args) + b"R"


def _tensor(key: str, numel: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    storage = _tuple(_str("storage"), _global("torch", "FloatStorage"), _str(key), _str("cpu"), _int(numel))
    return _call(
        _global("torch._utils", "_rebuild_tensor_v2"),
        storage + b"Q",  # BINPERSID: the tuple is a persistent id
        _int(offset),
        _tuple(*map(_int, size)),
        _tuple(*map(_int, stride)),
        b"\x89",  # requires_grad=False
        _call(_global("collections", "OrderedDict")),
    )


def _pickle(entries: dict[str, bytes]) -> bytes:
    body = b"".join(_str(name) + value for name, value in entries.items())
    return b"\x80\x02}(" + body + b"u."  # {name: value, …}


def _zip_checkpoint(path: Path, data_pkl: bytes, storages: dict[str, np.ndarray]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        for key, array in storages.items():
            archive.writestr(f"archive/data/{key}", array.astype("<f4").tobytes())
    return path


def _legacy_checkpoint(path: Path, data_pkl: bytes, storages: dict[str, np.ndarray]) -> Path:
    parts = [
        pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2),  # torch's magic number
        pickle.dumps(1001, protocol=2),
        pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {}}, protocol=2),
        data_pkl,
        pickle.dumps(list(storages), protocol=2),
    ]
    for array in storages.values():
        parts += [struct.pack("<q", array.size), array.astype("<f4").tobytes()]
    path.write_bytes(b"".join(parts))
    return path


WRITERS = {"zip": _zip_checkpoint, "legacy": _legacy_checkpoint}


# --- real files -------------------------------------------------------------------------------------
@pytest.mark.parity
@pytest.mark.parametrize(("model", "key"), [("campplus", None), ("ge2e", "model_state")])
def test_real_checkpoint_equals_torch_load(model: str, key: str | None) -> None:
    path = _weights(model)
    torch = _torch()
    reference = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None:
        reference = reference[key]
    ours = load_state_dict(path, key=key)
    assert list(ours) == list(reference)  # same names, same order
    for name, tensor in reference.items():
        expected = tensor.numpy()
        assert ours[name].dtype == expected.dtype, name
        assert ours[name].shape == expected.shape, name
        assert np.array_equal(ours[name], expected), name
        assert ours[name].flags.c_contiguous and ours[name].flags.writeable


def test_ge2e_without_key_says_which_keys_exist() -> None:
    path = _weights("ge2e")
    with pytest.raises(ModelError, match="model_state"):
        load_state_dict(path)
    with pytest.raises(ModelError, match="no entry 'weights'"):
        load_state_dict(path, key="weights")


def test_campplus_keeps_num_batches_tracked_as_0d_int64() -> None:
    state = load_state_dict(_weights("campplus"))
    counter = state["head.bn1.num_batches_tracked"]
    assert counter.shape == () and counter.dtype == np.int64 and int(counter) > 0


@pytest.mark.parametrize("model", ["campplus", "ge2e"])
@pytest.mark.parametrize("fraction", [0.001, 0.5, 0.999])
def test_truncated_real_file_is_refused(model: str, fraction: float, tmp_path: Path) -> None:
    data = _weights(model).read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelError, match=r"truncated|damaged"):
        load_state_dict(cut, key="model_state" if model == "ge2e" else None)


# --- files written by torch.save ----------------------------------------------------------------------
@pytest.mark.parity
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_views_offsets_and_dtypes_equal_torch_load(zip_format: bool, tmp_path: Path) -> None:
    torch = _torch()
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {
        "transposed": base.t(),  # strides (1, 10)
        "sliced": base[1:5, 2:9:3],  # offset 12, strides (10, 3)
        "row": base[4],  # same storage, offset 40
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "half": torch.linspace(-2, 2, 9, dtype=torch.float16),
        "double": torch.randn(3, 2, dtype=torch.float64),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "int32": torch.arange(-3, 3, dtype=torch.int32).reshape(2, 3).t(),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    path = tmp_path / "views.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    reference = torch.load(path, weights_only=True)
    ours = load_state_dict(path)
    assert list(ours) == list(state)
    for name, tensor in reference.items():
        expected = tensor.detach().numpy()
        assert ours[name].dtype == expected.dtype, name
        assert ours[name].shape == expected.shape, name
        assert np.array_equal(ours[name], expected), name


# --- files written opcode by opcode -------------------------------------------------------------------
@pytest.mark.parametrize("fmt", WRITERS)
def test_strided_view_of_hand_made_checkpoint(fmt: str, tmp_path: Path) -> None:
    flat = np.arange(12, dtype=np.float32)
    data_pkl = _pickle(
        {
            "t": _tensor("0", 12, 2, (3, 2), (1, 3)),  # columns of a 2×3 block starting at element 2
            "steps": _int(5),  # a plain int: not a tensor, left out
        }
    )
    state = load_state_dict(WRITERS[fmt](tmp_path / "m.pt", data_pkl, {"0": flat}))
    assert list(state) == ["t"]
    np.testing.assert_array_equal(state["t"], flat[2:8].reshape(2, 3).T)


@pytest.mark.parametrize("fmt", WRITERS)
def test_view_beyond_its_storage_is_refused(fmt: str, tmp_path: Path) -> None:
    # 3 × 3 elements with stride 4 reach element 8 + 2 = 10 of a 9-element storage: as_strided would read
    # memory that is not ours, so the loader must stop before it.
    data_pkl = _pickle({"t": _tensor("0", 9, 0, (3, 3), (4, 1))})
    path = WRITERS[fmt](tmp_path / "m.pt", data_pkl, {"0": np.zeros(9, np.float32)})
    with pytest.raises(ModelError, match="reaches element 10 of a storage of 9"):
        load_state_dict(path)


def test_storage_shorter_than_announced_is_refused(tmp_path: Path) -> None:
    data_pkl = _pickle({"t": _tensor("0", 9, 0, (9,), (1,))})
    path = _zip_checkpoint(tmp_path / "m.pt", data_pkl, {"0": np.zeros(4, np.float32)})
    with pytest.raises(ModelError, match="has 16 bytes, expected 36"):
        load_state_dict(path)


def test_a_deflate_bomb_is_not_decompressed(tmp_path: Path) -> None:
    # 9 floats announced; the member inflates to 64 MiB of zeros from a file of about 64 kB.
    data_pkl = _pickle({"t": _tensor("0", 9, 0, (9,), (1,))})
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("m/data.pkl", data_pkl)
        archive.writestr("m/data/0", bytes(64 * 2**20))
    assert path.stat().st_size < 2**20
    with pytest.raises(ModelError, match="holds more than the 36 bytes"):
        load_state_dict(path)


@pytest.mark.parametrize("fmt", WRITERS)
def test_truncated_hand_made_checkpoint_is_refused(fmt: str, tmp_path: Path) -> None:
    data_pkl = _pickle({"t": _tensor("0", 64, 0, (64,), (1,))})
    whole = WRITERS[fmt](tmp_path / "m.pt", data_pkl, {"0": np.ones(64, np.float32)}).read_bytes()
    assert load_state_dict(tmp_path / "m.pt")["t"].sum() == 64
    for end in (0, 3, len(whole) // 2, len(whole) - 1):
        (tmp_path / "cut.pt").write_bytes(whole[:end])
        with pytest.raises(ModelError, match=r"truncated|damaged|not a PyTorch checkpoint"):
            load_state_dict(tmp_path / "cut.pt")


@pytest.mark.parametrize("fmt", WRITERS)
@pytest.mark.parametrize(
    ("module", "name", "argument"),
    [
        ("os", "system", "touch {marker}"),
        ("builtins", "eval", "open({marker!r}, 'w')"),
        ("builtins", "exec", "open({marker!r}, 'w')"),
        ("subprocess", "call", "touch {marker}"),
        ("torch", "load", "{marker}"),  # torch, but not on the list
    ],
)
def test_forbidden_global_is_refused_and_nothing_runs(
    fmt: str, module: str, name: str, argument: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    payload = _call(_global(module, name), _str(argument.format(marker=str(marker))))
    # A valid tensor first, so the refusal happens mid-file, not on the first opcode.
    data_pkl = _pickle({"ok": _tensor("0", 2, 0, (2,), (1,)), "evil": payload})
    path = WRITERS[fmt](tmp_path / "evil.pt", data_pkl, {"0": np.zeros(2, np.float32)})
    with pytest.raises(ModelError, match=re.escape(f"global '{module}.{name}'")):
        load_state_dict(path)
    assert not marker.exists()


def test_pickle_made_by_a_malicious_class_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    path = _zip_checkpoint(tmp_path / "evil.pt", pickle.dumps({"w": Exploit()}, protocol=2), {})
    with pytest.raises(ModelError, match=r"global '(posix|os)\.system'"):
        load_state_dict(path)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ModelError, match=r"notes\.pt"):
        load_state_dict(text)
    with pytest.raises(ModelError, match="cannot read"):
        load_state_dict(tmp_path / "missing.pt")


def test_runtime_modules_do_not_import_torch() -> None:
    code = (
        "import sys, verifier.models.torch_weights, verifier.models.ge2e; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
