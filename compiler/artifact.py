"""The artifact directory: what the compiler writes and every backend loads.

Layout::

    DIR/manifest.json        model config, hardware params, preset, per-tensor format,
                             offsets and checksums, image sizes and checksums
    DIR/params.json          the HwParams the artifact was built for
    DIR/weights/chNN.bin     one image per HBM weight channel (formats.py layout);
                             tensor t lives at manifest offset t.offset in every channel
    DIR/tables.bin           float32 tables for the SFU (norm weights, ...)
    DIR/tokenizer.json       the GGUF tokenizer, so the artifact is self-contained
    DIR/program.bin ...      instruction images (added by the scheduler)

Everything is written into a temporary sibling directory and renamed into place, so
an interrupted or failed compile leaves no partial artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..hw.formats import PackedTensor, QTensor, ScaleRangeError, WeightFormat, align, pack_tensor, unpack_tensor
from ..hw.params import HwParams
from .gguf_import import ModelConfig

__all__ = ["ArtifactError", "ArtifactWriter", "Artifact", "atomic_dir", "atomic_write",
           "MANIFEST_VERSION"]

MANIFEST_VERSION = 3


class ArtifactError(ValueError):
    """An artifact that cannot be used; the message names the file or tensor at fault."""


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path, data: bytes | str):
    """Write a file through a temporary sibling and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_dir(out):
    """Yield a temporary directory that replaces ``out`` only if the block succeeds."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        raise ArtifactError(f"{out}: parent directory {out.parent} does not exist")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class ArtifactWriter:
    """Collects packed tensors and tables, then writes them as one artifact."""

    params: HwParams
    config: ModelConfig
    preset: str
    tensors: dict = field(default_factory=dict)      # name -> PackedTensor
    tables: dict = field(default_factory=dict)       # name -> float32 array
    extra: dict = field(default_factory=dict)        # more manifest entries
    files: dict = field(default_factory=dict)        # relative path -> bytes

    def add_tensor(self, name: str, qt: QTensor):
        """Pack ``qt``; ``ArtifactError`` naming the tensor if the build cannot run it."""
        try:
            self.params.check_format(qt.fmt, f"tensor {name!r}")
            self.tensors[name] = pack_tensor(qt, self.params)
        except ScaleRangeError as e:
            raise ArtifactError(f"tensor {name!r} ({qt.fmt.name}): {e}") from None
        except ValueError as e:
            raise ArtifactError(str(e)) from None

    def add_table(self, name: str, values):
        self.tables[name] = np.ascontiguousarray(values, dtype="<f4")

    def layout(self) -> dict:
        """The manifest sections ``model``, ``hw``, ``tensors`` and ``tables`` :meth:`write`
        produces (every offset), computed without writing: the one place they are laid out."""
        tensors, offset = {}, 0
        for name, pt in self.tensors.items():
            tensors[name] = {
                "format": pt.fmt.name, "shape": list(pt.shape), "shift": pt.shift, "offset": offset,
                "region_bytes": pt.region_bytes, "stored_bytes": pt.stored_bytes()}
            offset += pt.channel_bytes
        tables, toff = {}, 0
        for name, arr in self.tables.items():
            tables[name] = {"offset": toff, "shape": list(arr.shape)}
            toff += arr.nbytes
        return {"model": self.config.to_dict(), "hw": self.params.to_dict(), "tensors": tensors, "tables": tables}

    def write(self, out) -> Path:
        p = self.params
        with atomic_dir(out) as tmp:
            (tmp / "weights").mkdir()
            manifest = {"version": MANIFEST_VERSION, "preset": self.preset, **self.layout(), "images": {}}
            for c in range(p.weight_channels):
                img = b"".join(pt.channel_image(c) for pt in self.tensors.values())
                rel = f"weights/ch{c:02d}.bin"
                (tmp / rel).write_bytes(img)
                manifest["images"][rel] = {"bytes": len(img), "sha256": sha256(img)}
            tab = b"".join(arr.tobytes() for arr in self.tables.values())
            (tmp / "tables.bin").write_bytes(tab)
            manifest["images"]["tables.bin"] = {"bytes": len(tab), "sha256": sha256(tab)}
            for rel, data in self.files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
                manifest["images"][rel] = {"bytes": len(data), "sha256": sha256(data)}
            manifest.update(self.extra)
            (tmp / "params.json").write_text(p.to_json())
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        return Path(out)


class Artifact:
    """A compiled artifact on disk, checked against its manifest when opened."""

    def __init__(self, path, verify: bool = True):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise ArtifactError(f"{mf}: missing; not a flightllm artifact (run `flightllm compile`)")
        try:
            self.manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{mf}: corrupt JSON ({e})") from None
        if self.manifest.get("version") != MANIFEST_VERSION:
            raise ArtifactError(f"{mf}: manifest version {self.manifest.get('version')!r}, "
                                f"this flightllm reads version {MANIFEST_VERSION}")
        try:
            self.params = HwParams.from_dict(self.manifest["hw"])
            self.config = ModelConfig.from_dict(self.manifest["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{mf}: bad 'hw' or 'model' section ({e})") from None
        self._cache = {}
        if verify:
            for rel in self.manifest["images"]:
                self.read(rel)

    @property
    def preset(self) -> str:
        return self.manifest["preset"]

    def read(self, rel: str) -> bytes:
        """Bytes of an image, checked against the manifest's size and checksum."""
        if rel in self._cache:
            return self._cache[rel]
        info = self.manifest["images"].get(rel)
        if info is None:
            raise ArtifactError(f"{self.path}: no image {rel!r} in the manifest")
        f = self.path / rel
        if not f.is_file():
            raise ArtifactError(f"{f}: missing image")
        data = f.read_bytes()
        if len(data) != info["bytes"]:
            raise ArtifactError(f"{f}: {len(data)} bytes, manifest says {info['bytes']} (truncated?)")
        if sha256(data) != info["sha256"]:
            raise ArtifactError(f"{f}: checksum mismatch (corrupt image)")
        self._cache[rel] = data
        return data

    def tensor_names(self) -> list:
        return list(self.manifest["tensors"])

    def packed(self, name: str) -> PackedTensor:
        t = self.manifest["tensors"].get(name)
        if t is None:
            raise ArtifactError(f"{self.path}: no tensor {name!r}")
        try:
            fmt = WeightFormat.parse(t["format"])
        except ValueError as e:
            raise ArtifactError(f"{self.path}: tensor {name!r}: {e}") from None
        data = []
        for c in range(self.params.weight_channels):
            img = self.read(f"weights/ch{c:02d}.bin")
            data.append(img[t["offset"]:t["offset"] + t["region_bytes"]])
        return PackedTensor(fmt, tuple(t["shape"]), t["shift"], self.params.chains, self.params.chain_len, data)

    def unpacked(self, name: str) -> QTensor:
        """The tensor's integers, scales and mins as they sit in HBM."""
        pt = self.packed(name)
        try:
            return unpack_tensor(pt)
        except ValueError as e:
            raise ArtifactError(f"{self.path}: tensor {name!r}: {e}") from None

    def table(self, name: str) -> np.ndarray:
        t = self.manifest["tables"].get(name)
        if t is None:
            raise ArtifactError(f"{self.path}: no table {name!r}")
        n = int(np.prod(t["shape"]))
        raw = self.read("tables.bin")
        return np.frombuffer(raw, dtype="<f4", count=n, offset=t["offset"]).reshape(t["shape"])

    def dequantized(self, name: str) -> np.ndarray:
        """float32 weights (``d * q + mn``, as GGUF dequantizes)."""
        return self.unpacked(name).dequantize()
