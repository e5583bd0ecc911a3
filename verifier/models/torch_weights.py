"""Read the tensors of a PyTorch checkpoint (``.pt``) without torch and without running its pickle.

A ``.pt`` file is a pickle, and unpickling an untrusted pickle can run any code. We unpickle with an
allow-list instead: the only globals a checkpoint may name are ``collections.OrderedDict``, torch's two
tensor rebuild functions and the typed storage classes (``torch.FloatStorage`` …). Those torch names
resolve to small stand-ins defined here, so torch is never imported; anything else is refused with a
:class:`ModelError` that names the global.

Two on-disk formats exist and both are read:

* the zip format (torch >= 1.6): ``<prefix>/data.pkl`` is the pickle and each storage's raw bytes are in
  the entry ``<prefix>/data/<key>``; an optional ``<prefix>/byteorder`` says ``little`` or ``big``;
* the legacy format: five things back to back in one stream — a pickled magic number, a pickled protocol
  version, a pickled dict of system facts (byte order, type sizes), the main pickle, a pickled list of
  storage keys, then for each of those keys in turn an 8-byte little-endian element count followed by the
  storage's raw bytes.

Tensors are rebuilt lazily: while unpickling, a tensor is only a reference (storage, offset, shape,
strides); after the pickle is read and its storages are known, the tensors of the selected dict are cut
out of their storages with numpy. So nothing from the file is interpreted before it has been checked.

Allow-listed globals are not enough to make unpickling safe, so before a pickle is run its opcodes are
read (``pickletools``, which runs nothing) and refused if it shares a container between two places
(the memo, ``DUP``), nests deeper than any checkpoint does, holds an integer no checkpoint needs or
numbers a memo entry far beyond its length: a few hundred bytes of shared tuples would otherwise be hashed
or printed for ever, a deep one overflows the C stack, a huge integer cannot even be printed, and one
memo index makes the unpickler allocate gigabytes. The stand-ins refuse ``BUILD``, which
would otherwise let a file change them for every file read after it.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from verifier.errors import ModelError

# Numpy dtypes of torch's typed storage classes (byte order is applied later: "<" or ">").
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}

# The first object of a legacy checkpoint (torch.serialization.MAGIC_NUMBER) and its format version.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _Sealed:
    """What the unpickler's BUILD opcode would change (``__setstate__``, else the instance ``__dict__`` or
    attributes), refused: a file must not change the loader's objects for the files read after it."""

    def __setstate__(self, state: Any) -> None:
        raise ModelError(
            "checkpoint is malformed: it changes a tensor, a storage or an allow-listed global (BUILD), "
            "which a checkpoint never does"
        )


@dataclass(frozen=True)
class _StorageType(_Sealed):
    """Stand-in for ``torch.FloatStorage`` & co.: only says which dtype the storage holds."""

    name: str
    dtype: str


@dataclass(frozen=True)
class _Storage(_Sealed):
    """A storage named by a persistent id: its bytes are fetched later from the archive or stream."""

    key: str
    dtype: str
    numel: int
    # Legacy files may describe a storage as a slice of another one ("view"): element offset in the root.
    root_offset: int = 0


@dataclass(frozen=True)
class _TensorRef(_Sealed):
    """What ``_rebuild_tensor_v2`` was asked to build, kept until the storages have been read."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    # Same signature as torch._utils._rebuild_tensor_v2; autograd fields mean nothing for inference.
    if not isinstance(storage, _Storage):
        raise ModelError("checkpoint is malformed: a tensor refers to something that is not a storage")
    return _TensorRef(storage, _as_int(storage_offset), _as_ints(size), _as_ints(stride))


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> _TensorRef:
    # An nn.Parameter is pickled as its tensor wrapped in this call; for us the tensor is all there is.
    if not isinstance(data, _TensorRef):
        raise ModelError("checkpoint is malformed: a parameter does not wrap a tensor")
    return data


def _as_int(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ModelError(f"checkpoint is malformed: expected a non-negative int, got {value!r}")
    return value


def _as_ints(values: Any) -> tuple[int, ...]:
    if not isinstance(values, tuple):
        raise ModelError(f"checkpoint is malformed: expected a tuple of ints, got {values!r}")
    return tuple(_as_int(v) for v in values)


class _Function(_Sealed):
    """An allow-listed function as a pickle sees it: it can be called, not changed."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self._function = function

    def __call__(self, *args: Any) -> Any:
        return self._function(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,  # a builtin type: BUILD cannot change it
    ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and turns storage ids into :class:`_Storage`."""

    def __init__(self, file: BinaryIO, source: str) -> None:
        super().__init__(file)
        self.file = file
        self.source = source
        self.storages: dict[str, _Storage] = {}

    def load(self) -> Any:
        start = self.file.tell()
        _check_structure(self.file, self.source)
        self.file.seek(start)
        return super().load()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ModelError(
                f"{self.source}: refusing to load the global '{module}.{name}': a weights file may only "
                "refer to tensors, storages and OrderedDict. It may be malicious or not a plain state dict; "
                "re-save it with torch.save(model.state_dict(), path) from a trusted environment."
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        # Zip format: ('storage', type, key, location, numel); legacy adds view_metadata, which is None or
        # (view_key, offset, view_numel) for a slice of a shared storage. The location (cpu, cuda:0) is
        # irrelevant: every storage is read into host memory.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise ModelError(f"{self.source}: unsupported persistent id {str(pid)[:80]!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise ModelError(f"{self.source}: malformed storage reference {str(pid)[:80]!r}")
        storage = _Storage(key, storage_type.dtype, _as_int(numel))
        known = self.storages.setdefault(key, storage)
        if known != storage:
            raise ModelError(f"{self.source}: storage {key!r} is described twice, differently")
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return storage
        if not (isinstance(view, tuple) and len(view) == 3):
            raise ModelError(f"{self.source}: malformed storage view {view!r}")
        view_key, view_offset, view_numel = view
        if not isinstance(view_key, str):
            raise ModelError(f"{self.source}: malformed storage view {view!r}")
        if _as_int(view_offset) + _as_int(view_numel) > storage.numel:
            raise ModelError(f"{self.source}: storage view {view_key!r} lies outside its storage")
        return _Storage(key, storage.dtype, view_numel, root_offset=view_offset)


# How deep a checkpoint nests (dict, tensor arguments, persistent id, …: about 5) and the largest integer it
# holds (the legacy magic number has 80 bits), with room to spare; beyond them a pickle is refused.
_MAX_DEPTH = 64
_MAX_INT_BITS = 4096
# Opcodes that push a value holding nothing else from the pickle (memoised and fetched in every
# checkpoint: strings, globals); persistent ids become storages, made by us.
_ATOMS = {
    *("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"),
    *("STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"),
    *("UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "NONE", "NEWTRUE", "NEWFALSE"),
    *("EMPTY_TUPLE", "GLOBAL", "STACK_GLOBAL", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"),
}
_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}  # change the object below
_TENSOR_CALLS = {"global torch._utils _rebuild_tensor_v2", "global torch._utils _rebuild_parameter"}


def _check_structure(file: BinaryIO, source: str) -> None:
    """Read one pickle's opcodes without running them and refuse what no checkpoint holds: a container
    used in two places (memo, DUP), nesting deeper than ``_MAX_DEPTH``, an integer over ``_MAX_INT_BITS``,
    a memo index beyond the pickle's length.

    Each stack item is tracked as (kind, depth): kind "atom", "tensor" (what the rebuild functions make:
    tied weights share those), "global <module> <name>" or "container". Torch (pickle protocol 2)
    memoises and re-uses strings, globals and tensors only; a pickle that re-uses a container can double
    its size at every level (2**60 nodes in 400 bytes), which hashing or printing would walk for ever.
    """
    stack: list[tuple[str, int]] = []
    marks: list[int] = []
    memo: dict[Any, tuple[str, int]] = {}
    try:
        for opcode, arg, position in pickletools.genops(file):
            name = opcode.name
            if name == "STOP":
                return
            if name == "MARK":
                marks.append(len(stack))
                continue
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                index = len(memo) if name == "MEMOIZE" else arg
                if not 0 <= index <= position:  # picklers number memo entries 0, 1, 2…
                    # the C unpickler grows its memo table to the index: 4 bytes ask for up to 32 GB
                    raise ModelError(f"{source}: the pickle numbers an object {index}, beyond its own length")
                memo[index] = stack[-1]
                continue
            if name in ("GET", "BINGET", "LONG_BINGET", "DUP"):
                item = stack[-1] if name == "DUP" else memo.get(arg, ("atom", 0))
                if item[0] == "container":
                    raise ModelError(
                        f"{source}: the pickle uses one container in two places, which no checkpoint does "
                        "(it could take for ever to read); the file is damaged or crafted"
                    )
                stack.append(item)
                continue
            if isinstance(arg, int) and abs(arg).bit_length() > _MAX_INT_BITS:
                raise ModelError(f"{source}: the pickle holds an integer of {arg.bit_length()} bits")
            if name == "POP" and marks and marks[-1] == len(stack):  # POP drops a mark when it is on top
                marks.pop()
                continue
            before = opcode.stack_before
            count = before.index(pickletools.markobject) if pickletools.markobject in before else len(before)
            start = marks.pop() - count if pickletools.markobject in before else len(stack) - count
            if start < 0:
                raise ValueError("stack underflow")
            popped, stack[start:] = stack[start:], []
            if name in _ATOMS:
                item = ("global " + arg if name == "GLOBAL" else "atom", 0)
            elif name == "REDUCE" and popped[0][0] in _TENSOR_CALLS:
                item = ("tensor", 1)
            elif name in _IN_PLACE:  # the container below gets the items above it
                depth = 1 + max((depth for _, depth in popped[1:]), default=0)
                item = (popped[0][0], max(popped[0][1], depth))
            else:
                item = ("container", 1 + max((depth for _, depth in popped), default=0))
            if item[1] > _MAX_DEPTH:
                raise ModelError(f"{source}: the pickle nests deeper than {_MAX_DEPTH} levels")
            stack.extend([item] * len(opcode.stack_after))
    except ModelError:
        raise
    except Exception as exc:  # ValueError from pickletools, IndexError on an empty stack…
        raise ModelError(
            f"{source}: cannot unpickle ({type(exc).__name__}: {exc}); the file is truncated, damaged or "
            "not a PyTorch checkpoint"
        ) from exc


def load_state_dict(path: Path | str, *, key: str | None = None) -> dict[str, np.ndarray]:
    """Read the tensors of a PyTorch checkpoint as numpy arrays, in file order, never running its pickle.

    ``key`` selects a dict nested in the checkpoint (``"model_state"`` for resemblyzer's ``pretrained.pt``);
    without it the checkpoint itself must be the dict of tensors. Every tensor becomes a C-contiguous,
    native-byte-order numpy array of its dtype; 0-d tensors such as BatchNorm's ``num_batches_tracked``
    stay 0-d arrays (int64). Entries that are not tensors (Python numbers, strings, nested dicts) are left
    out: a state dict's contract is names to tensors. Raises :class:`ModelError` when the file is not a
    checkpoint, is truncated, or names a global outside the allow-list.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            if _is_zip(file):
                return _load_zip(file, path.name, key)
            file.seek(0)
            if file.read(4) == b"PK\x03\x04":
                raise ModelError(
                    f"{path.name}: starts like a zip checkpoint but its zip directory is missing: the file "
                    "is truncated or damaged; download it again"
                )
            file.seek(0)
            return _load_legacy(file, path.name, key)
    except OSError as exc:
        raise ModelError(f"cannot read the weights file {path}: {exc}") from exc


def _is_zip(file: BinaryIO) -> bool:
    try:
        return zipfile.is_zipfile(file)
    except zipfile.BadZipFile:  # it raises for a ZIP64 end record it cannot use: a zip, if a damaged one
        return True


def _unpickle(unpickler: _RestrictedUnpickler) -> Any:
    try:
        return unpickler.load()
    except ModelError:
        raise
    except Exception as exc:
        # A damaged pickle can fail in many ways (EOFError, UnpicklingError, ValueError, TypeError,
        # MemoryError …); to the caller they all mean the same thing.
        raise ModelError(
            f"{unpickler.source}: cannot unpickle ({type(exc).__name__}: {exc}); the file is truncated, "
            "damaged or not a PyTorch checkpoint"
        ) from exc


def _select(obj: Any, key: str | None, source: str) -> Mapping[Any, Any]:
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise ModelError(f"{source}: no entry {key!r} in the checkpoint (it holds: {keys})")
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ModelError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    if not any(isinstance(v, _TensorRef) for v in obj.values()):
        keys = ", ".join(map(str, obj))
        raise ModelError(
            f"{source}: the selected dict holds no tensors (keys: {keys}); pass key=… to pick one"
        )
    return obj


def _materialise(
    entries: Mapping[Any, Any], read_storage: Callable[[_Storage], np.ndarray], source: str
) -> dict[str, np.ndarray]:
    result: dict[str, np.ndarray] = {}
    for name, value in entries.items():
        if isinstance(value, _TensorRef):
            result[str(name)] = _cut(value, read_storage(value.storage), f"{source}: tensor {name!r}")
    return result


def _cut(ref: _TensorRef, flat: np.ndarray, where: str) -> np.ndarray:
    """Apply a tensor's offset, shape and strides to its storage, checking that it stays inside it."""
    if len(ref.shape) != len(ref.strides):
        raise ModelError(f"{where}: shape {ref.shape} and strides {ref.strides} do not match")
    if 0 in ref.shape:
        return np.empty(ref.shape, dtype=flat.dtype.newbyteorder("="))  # native order, as below
    if math.prod(ref.shape) > flat.size:  # strides of 0 (an expanded tensor) could ask for terabytes
        raise ModelError(
            f"{where}: shape {ref.shape} has more elements than its storage of {flat.size}; "
            "save a contiguous copy (tensor.contiguous())"
        )
    # as_strided would happily read past the buffer, so the last element it touches is checked first.
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides, strict=True))
    if last >= flat.size:
        raise ModelError(f"{where}: reaches element {last} of a storage of {flat.size}; the file is damaged")
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=ref.shape,
        strides=tuple(s * flat.itemsize for s in ref.strides),
        writeable=False,
    )
    # A copy that owns C-contiguous native-order memory (np.ascontiguousarray would make 0-d arrays 1-d).
    return np.array(view, dtype=view.dtype.newbyteorder("="), order="C")


def _load_zip(file: BinaryIO, source: str, key: str | None) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(file)
        names = archive.namelist()
    except (zipfile.BadZipFile, ValueError, NotImplementedError) as exc:  # e.g. "zip file version 8.4"
        raise ModelError(f"{source}: damaged zip checkpoint ({exc}); download it again") from exc
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise ModelError(f"{source}: a zip checkpoint must contain exactly one <dir>/data.pkl")
    prefix = pickles[0].removesuffix("data.pkl")
    order = "<"
    if f"{prefix}byteorder" in names:
        order = "<" if _read_member(archive, f"{prefix}byteorder", source).strip() == b"little" else ">"

    unpickler = _RestrictedUnpickler(io.BytesIO(_read_member(archive, pickles[0], source)), source)
    entries = _select(_unpickle(unpickler), key, source)

    cache: dict[str, np.ndarray] = {}
    members = set(names)

    def read_storage(storage: _Storage) -> np.ndarray:
        if storage.key not in cache:
            dtype = np.dtype(order + storage.dtype)
            name = f"{prefix}data/{storage.key}"
            if name not in members:
                raise ModelError(f"{source}: storage {storage.key!r} is missing from the archive")
            raw = _read_member(archive, name, source, limit=storage.numel * dtype.itemsize)
            if len(raw) != storage.numel * dtype.itemsize:
                raise ModelError(
                    f"{source}: storage {storage.key!r} has {len(raw)} bytes, expected "
                    f"{storage.numel * dtype.itemsize}; the file is damaged"
                )
            cache[storage.key] = np.frombuffer(raw, dtype=dtype)
        return cache[storage.key][storage.root_offset :][: storage.numel]

    return _materialise(entries, read_storage, source)


_MAX_PICKLE_BYTES = 64 * 2**20  # a state dict's pickle is kilobytes; its tensors live in other members


def _read_member(archive: zipfile.ZipFile, name: str, source: str, limit: int = _MAX_PICKLE_BYTES) -> bytes:
    """A member's bytes, decompressing no more than ``limit`` + 1 of them (a deflate bomb stops there)."""
    try:
        with archive.open(name) as member:
            data = member.read(limit + 1)
    except Exception as exc:
        # A damaged member fails in many ways (BadZipFile for a bad CRC, zlib.error, NotImplementedError
        # for a compression method zipfile lacks, EOFError …); to the caller they all mean the same thing.
        raise ModelError(
            f"{source}: cannot read {name} ({type(exc).__name__}: {exc}); the file is damaged"
        ) from exc
    if len(data) > limit:
        raise ModelError(f"{source}: {name} holds more than the {limit} bytes it should; the file is damaged")
    return data


def _load_legacy(file: BinaryIO, source: str, key: str | None) -> dict[str, np.ndarray]:
    def header() -> Any:
        return _unpickle(_RestrictedUnpickler(file, source))

    if header() != _LEGACY_MAGIC:
        raise ModelError(f"{source}: not a PyTorch checkpoint (bad magic number)")
    version = header()
    if version != _LEGACY_PROTOCOL:
        raise ModelError(f"{source}: unsupported legacy checkpoint protocol {version!r}")
    sys_info = header()
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise ModelError(f"{source}: only little-endian legacy checkpoints are supported")

    unpickler = _RestrictedUnpickler(file, source)
    entries = _select(_unpickle(unpickler), key, source)
    storage_keys = header()
    if not (isinstance(storage_keys, list) and all(isinstance(k, str) for k in storage_keys)):
        raise ModelError(f"{source}: malformed list of storage keys")

    # The storages follow in the order of that list; read those the selected tensors need, skip the rest.
    wanted = {v.storage.key for v in entries.values() if isinstance(v, _TensorRef)}
    flats: dict[str, np.ndarray] = {}
    for storage_key in storage_keys:
        storage = unpickler.storages.get(storage_key)
        if storage is None:
            raise ModelError(f"{source}: storage {storage_key!r} is listed but never used")
        count_bytes = file.read(8)
        if len(count_bytes) != 8:
            raise ModelError(f"{source}: the file ends before storage {storage_key!r}; it is truncated")
        (count,) = struct.unpack("<q", count_bytes)
        if count != storage.numel:
            raise ModelError(
                f"{source}: storage {storage_key!r} holds {count} elements, expected {storage.numel}"
            )
        dtype = np.dtype("<" + storage.dtype)
        size = count * dtype.itemsize
        if storage_key in wanted:
            raw = file.read(size)
            if len(raw) != size:
                raise ModelError(f"{source}: the file ends inside storage {storage_key!r}; it is truncated")
            flats[storage_key] = np.frombuffer(raw, dtype=dtype)
        else:
            file.seek(size, io.SEEK_CUR)
    # A seek past the end does not fail, so the end of the file is checked once at the end.
    position = file.tell()
    if position > file.seek(0, io.SEEK_END):
        raise ModelError(f"{source}: the file ends inside its storages; it is truncated")

    def read_storage(storage: _Storage) -> np.ndarray:
        if storage.key not in flats:
            raise ModelError(f"{source}: storage {storage.key!r} is not in the file's list of storages")
        return flats[storage.key][storage.root_offset :][: storage.numel]

    return _materialise(entries, read_storage, source)
