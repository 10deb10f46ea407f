"""The on-disk format of a base cache and its reader.

A cache is a directory::

    manifest.json      what was cached, by what, from what (checked at load and on resume), the
                       hashes of examples.json and chunks.json and its own checksum
    examples.json      per example: its id, first row, number of rows and input key (the hash of
                       its attended input tokens: what the base model's outputs depend on)
    chunks.json        per written chunk (a batch of the build): its rows and the BLAKE2b of
                       every array's bytes over those rows (verified at load, optionally per read)
    positions.npy      (R,) int32   each row's token position within its example (padding skipped)
    targets.npy        (R,) int32   each row's target token id
    hidden.npy         (R, D)       exact mode: the base model's final hidden states, model dtype
                                    (bfloat16 stored as uint16 bits: numpy has no bfloat16)
    values.npy         (R, k) f32   top-k mode: the k largest base logits (raw)
    indices.npy        (R, k) i32   top-k mode: their token ids
    lse.npy tail_lse.npy target.npy (R,) f32  top-k mode: forgetkern.TopKBase's fields
    done/chunk_<i>     one record per written chunk, its rows and checksums (resume skips
                       those; gathered into chunks.json when the cache is complete)

One row per target token (a label other than ``ignore_index`` after the causal shift), rows of an
example contiguous and in position order. Every array is a ``.npy`` file read through
``numpy.memmap``: a lookup copies only the rows of its batch. :class:`CacheWriter` is the one
writer of this layout (``build_cache`` and importers of other tools' outputs): callers hand it
rows, it computes the checksums, hashes and the format version itself.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .._files import atomic_open
from .keys import digest, example_key

FORMAT_VERSION = 2
MODES = ("exact", "topk")
#: Manifest fields that identify what a cache holds; a resumed build must agree on all of them.
IDENTITY = ("format_version", "mode", "k", "temperature", "dtype", "hidden_size", "vocab_size",
            "ignore_index", "shift_labels", "model", "tokenizer", "data", "examples_hash")
ROW_FILES = {"positions": np.int32, "targets": np.int32}
TOPK_FILES = ("values", "indices", "lse", "tail_lse", "target")

#: Names a cache directory may hold (anything else: not a cache's directory, never written into).
OWNED = ("manifest.json", "examples.json", "chunks.json", "done", *(f"{n}.npy" for n in (
    *ROW_FILES, "hidden", *TOPK_FILES)))

TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in
                 (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


class CacheError(ValueError):
    """A cache directory that is damaged, truncated or inconsistent (the message names the file
    and the field)."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def numpy_storage(dtype: torch.dtype):
    """The numpy dtype a tensor of ``dtype`` is stored as (bfloat16 as its uint16 bits)."""
    return np.uint16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype


def bytes_per_token(mode: str, *, hidden_size: int = 0, dtype: torch.dtype = torch.bfloat16,
                    k: int = 0) -> int:
    """Bytes one target token takes on disk: exact ``D * itemsize``, top-k ``8 k + 12``, plus 8
    for its position and target id."""
    if mode == "exact":
        return hidden_size * torch.empty(0, dtype=dtype).element_size() + 8
    return 8 * k + 12 + 8


def file_shapes(manifest: dict) -> dict:
    """``name -> (shape, numpy dtype)`` of every row array of a cache."""
    rows = manifest["rows"]
    shapes = {name: ((rows,), dt) for name, dt in ROW_FILES.items()}
    if manifest["mode"] == "exact":
        dtype = TORCH_DTYPES[manifest["dtype"]]
        shapes["hidden"] = ((rows, manifest["hidden_size"]), numpy_storage(dtype))
    else:
        k = manifest["k"]
        shapes.update(values=((rows, k), np.float32), indices=((rows, k), np.int32),
                      lse=((rows,), np.float32), tail_lse=((rows,), np.float32),
                      target=((rows,), np.float32))
    return shapes


def open_arrays(path: Path, manifest: dict, mode: str) -> dict:
    """The row arrays as ``numpy.memmap`` (``mode``: ``"w+"`` creates them, ``"r+"``, ``"r"``);
    a missing, truncated or reshaped file is a :class:`CacheError` naming it."""
    out = {}
    for name, (shape, dt) in file_shapes(manifest).items():
        file = path / f"{name}.npy"
        if mode == "w+":
            out[name] = np.lib.format.open_memmap(file, mode="w+", dtype=dt, shape=shape)
            continue
        try:
            arr = np.load(file, mmap_mode=mode)
        except (OSError, ValueError, EOFError) as exc:
            raise CacheError(f"{file}: cannot be read as a .npy array (missing, truncated or "
                             f"damaged: {exc})") from exc
        if arr.shape != shape or arr.dtype != np.dtype(dt):
            raise CacheError(f"{file}: shape {arr.shape} {arr.dtype}, the manifest says "
                             f"{shape} {np.dtype(dt)}")
        if file.stat().st_size != arr.offset + arr.nbytes:
            raise CacheError(f"{file}: {file.stat().st_size} bytes, the header and shape say "
                             f"{arr.offset + arr.nbytes} (truncated or extended)")
        out[name] = arr
    return out


def read_json(file: Path) -> dict:
    """A JSON object from ``file``; unreadable or malformed content is a :class:`CacheError`."""
    try:
        with open(file) as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise CacheError(f"{file}: missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{file}: not valid JSON (damaged or truncated: {exc})") from exc
    if not isinstance(data, dict):
        raise CacheError(f"{file}: a JSON object is expected, got {type(data).__name__}")
    return data


def write_json(file: Path, data: dict) -> None:
    """Write ``data`` atomically (a temporary file renamed over ``file``)."""
    with atomic_open(file, "w") as f:
        json.dump(data, f, indent=1)


def json_digest(data) -> str:
    """:func:`digest` of the canonical JSON of ``data`` (sorted keys, no spaces)."""
    return digest(json.dumps(data, sort_keys=True, separators=(",", ":")))


def _check(ok: bool, file, field: str, want: str, got) -> None:
    if not ok:
        raise CacheError(f"{file}: field {field!r} must be {want}, got {got!r}")


def _is_int(x, low=None) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and (low is None or x >= low)


def check_manifest(manifest: dict, file) -> None:
    """Every field of a manifest against the format (a :class:`CacheError` naming the file and
    the field): the format version, the checksum over the other fields, and each field's type
    and range."""
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(f"{file}: field 'format_version' is {version!r}; this forgetkern reads "
                         f"format {FORMAT_VERSION} (rebuild the cache with this version)")
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    if manifest.get("checksum") != json_digest(body):
        raise CacheError(f"{file}: the manifest's checksum does not match its fields (edited or "
                         "damaged)")
    m, get = manifest, manifest.get
    _check(get("mode") in MODES, file, "mode", f"one of {MODES}", get("mode"))
    _check(get("dtype") in TORCH_DTYPES, file, "dtype", f"one of {sorted(TORCH_DTYPES)}",
           get("dtype"))
    _check(_is_int(get("vocab_size"), 1), file, "vocab_size", "an int >= 1", get("vocab_size"))
    _check(_is_int(get("rows"), 0), file, "rows", "an int >= 0", get("rows"))
    _check(_is_int(get("ignore_index")), file, "ignore_index", "an int", get("ignore_index"))
    _check(isinstance(get("complete"), bool), file, "complete", "true or false", get("complete"))
    for name, needed in (("examples_hash", True), ("chunks_hash", m["complete"])):
        _check(not needed or isinstance(get(name), str), file, name, "a hash", get(name))
    if m["mode"] == "exact":
        _check(_is_int(get("hidden_size"), 1), file, "hidden_size", "an int >= 1",
               get("hidden_size"))
        return
    _check(_is_int(get("k"), 1) and get("k") <= m["vocab_size"], file, "k",
           f"an int in [1, vocab_size={m['vocab_size']}]", get("k"))
    t = get("temperature")
    _check(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0,
           file, "temperature", "a finite number > 0", t)


def chunk_checksums(arrays: dict, start: int, stop: int) -> dict:
    """``name -> digest`` of every array's rows ``[start, stop)``."""
    return {name: digest(np.asarray(arr[start:stop])) for name, arr in arrays.items()}


def verify_chunks(path: Path, arrays: dict, chunks: list) -> None:
    """Recompute the checksums of ``chunks`` (records of chunks.json) and raise a
    :class:`CacheError` naming the file and the rows of the first that differs."""
    for rec in chunks:
        start, stop = rec["start"], rec["stop"]
        for name, want in rec["checksums"].items():
            if digest(np.asarray(arrays[name][start:stop])) != want:
                raise CacheError(f"{path / (name + '.npy')}: rows [{start}, {stop}) do not match "
                                 "their checksum (the file was modified or damaged)")


def identity_mismatch(have: dict, want: dict) -> str | None:
    """The first identity field (:data:`IDENTITY`) on which two manifests differ, described."""
    for key in IDENTITY:
        if key in want and have.get(key) != want.get(key):
            return f"{key}: the cache has {have.get(key)!r}, expected {want.get(key)!r}"
    return None


class CacheWriter:
    """The one writer of a cache directory: ``build_cache`` and importers of other tools' base
    outputs both write through it. Callers describe the cache and hand it rows; the writer
    computes the format version, the checksums and the hashes itself::

        w = CacheWriter(out, mode="topk", vocab_size=V, k=64, temperature=1.0,
                        ids=ids, counts=counts, keys=keys)      # keys: store.input_keys / input_key
        for i, (start, rows) in enumerate(chunks):              # rows: {name: (n, ...) array}
            if not w.done(i):
                w.write(i, start, **rows)                       # positions, targets, + mode's
        w.finish()                                              # BaseCache(out) opens it

    ``ids``, ``counts``, ``keys``: per example (rows contiguous, in this order) its id (int or
    str, unique), its number of target rows and its input key. An existing directory holding the
    same cache (every identity field equal) is resumed: :meth:`done` tells the chunks already
    written. ``dtype``/``hidden_size`` describe exact mode's hidden states; ``model``,
    ``tokenizer``, ``data``: identity records (dicts) kept in the manifest.
    """

    def __init__(self, path, *, mode: str, vocab_size: int, ids, counts, keys, k=None,
                 temperature=None, dtype=torch.float32, hidden_size: int = 0,
                 ignore_index: int = -100, shift_labels: bool = True, model=None, tokenizer=None,
                 data=None):
        self.path = Path(path)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not (len(ids) == len(counts) == len(keys)) or any(not _is_int(c, 0) for c in counts):
            raise ValueError("ids, counts and keys must be one entry per example, counts ints >= 0")
        ids = [example_key(i) for i in ids]
        if len(set(ids)) != len(ids):
            raise ValueError("example ids must be unique")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist() if ids else []
        self.examples = {"ids": ids, "start": starts, "count": [int(c) for c in counts],
                         "keys": list(keys)}
        rows = int(sum(counts))
        self.manifest = {
            "format_version": FORMAT_VERSION, "mode": mode, "k": k if mode == "topk" else None,
            "temperature": float(temperature) if mode == "topk" else None,
            "dtype": dtype_name(dtype), "hidden_size": hidden_size if mode == "exact" else 0,
            "vocab_size": vocab_size, "ignore_index": ignore_index, "shift_labels": shift_labels,
            "model": model, "tokenizer": tokenizer, "data": data, "rows": rows,
            "examples_hash": json_digest(self.examples), "complete": False,
            "bytes_per_token": bytes_per_token(mode, hidden_size=hidden_size, dtype=dtype, k=k or 0)}
        self.manifest["checksum"] = json_digest(self.manifest)
        check_manifest(self.manifest, "the cache's description")  # k, temperature, sizes
        self.complete, self.resumed = False, False
        file = self.path / "manifest.json"
        if file.exists():
            have = read_json(file)
            check_manifest(have, file)
            why = identity_mismatch(have, self.manifest)
            if why:
                raise ValueError(f"{self.path} holds a different base cache ({why}); choose "
                                 "another directory or delete it")
            self.complete, self.resumed = have["complete"], True
            if not self.complete:
                self.arrays = open_arrays(self.path, self.manifest, "r+")
            return
        if self.path.exists() and not all(p.name in OWNED or p.name.startswith(".tmp-")
                                          for p in self.path.iterdir()):
            raise ValueError(f"{self.path} exists and holds files that are not a base cache's; "
                             "choose a new or empty directory")
        (self.path / "done").mkdir(parents=True, exist_ok=True)
        self.arrays = open_arrays(self.path, self.manifest, "w+")
        write_json(self.path / "examples.json", self.examples)
        write_json(file, self.manifest)

    def _marker(self, index: int) -> Path:
        return self.path / "done" / f"chunk_{index:06d}"

    def done(self, index: int) -> bool:
        """Whether chunk ``index`` was written (a damaged record counts as not written)."""
        try:
            return self.complete or {"start", "stop", "checksums"} <= set(read_json(self._marker(index)))
        except CacheError:
            return False

    def write(self, index: int, start: int, **rows) -> None:
        """Write chunk ``index``: rows ``[start, start + n)`` of every array (``rows``: the
        arrays' names, each an ``(n, ...)`` numpy array or tensor), flush them, then record the
        chunk with its checksums (an interrupted write leaves the chunk to do again)."""
        names = set(file_shapes(self.manifest))
        if set(rows) != names:
            raise ValueError(f"write: rows must name exactly {sorted(names)}, got {sorted(rows)}")
        n = len(rows["positions"])
        if not (_is_int(start, 0) and start + n <= self.manifest["rows"]):
            raise ValueError(f"write: rows [{start}, {start + n}) outside [0, {self.manifest['rows']})")
        shapes = file_shapes(self.manifest)
        for name, value in rows.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu()
                if name == "hidden":
                    value = value.to(TORCH_DTYPES[self.manifest["dtype"]])
                value = (value.view(torch.uint16) if value.dtype == torch.bfloat16 else value).numpy()
            if tuple(value.shape) != (n, *shapes[name][0][1:]):
                raise ValueError(f"write: {name} must be {(n, *shapes[name][0][1:])}, got "
                                 f"{tuple(value.shape)}")
            self.arrays[name][start:start + n] = value
        for arr in self.arrays.values():
            arr.flush()
        write_json(self._marker(index), {"start": start, "stop": start + n,
                                         "checksums": chunk_checksums(self.arrays, start, start + n)})

    def finish(self) -> dict:
        """Mark the cache complete after checking that the written chunks cover every row once;
        returns the manifest."""
        if self.complete:
            return read_json(self.path / "manifest.json")
        chunks = sorted((read_json(m) for m in (self.path / "done").glob("chunk_*")),
                        key=lambda r: (r["start"], r["stop"]))
        end = 0
        for rec in chunks:
            if rec["start"] != end:
                break
            end = rec["stop"]
        if end != self.manifest["rows"]:
            raise ValueError(f"{self.path}: rows [{end}, ...) of {self.manifest['rows']} were "
                             "never written (or written twice); the cache stays incomplete")
        table = {"chunks": [c for c in chunks if c["stop"] > c["start"]]}
        write_json(self.path / "chunks.json", table)
        manifest = {k: v for k, v in self.manifest.items() if k != "checksum"}
        manifest.update(complete=True, chunks_hash=json_digest(table))
        manifest["checksum"] = json_digest(manifest)
        write_json(self.path / "manifest.json", manifest)
        self.complete, self.manifest = True, manifest
        return manifest
