"""The best-config cache: one JSON file per device, safe for several processes to write at once.

File format (``results/cache/<device key>.json``)::

    {"format": 1,
     "entries": {"<family>/<dtype>/<k>=<v>,...": {
         "family", "dtype", "shape", "config",        # what was tuned and the winner
         "ms", "ms_p20", "ms_p80", "baseline_ms",     # confirmed median, spread, vendor baseline
         "trials", "failed_trials", "sampler", "seed", "study",
         "device", "device_key", "capability", "triton", "torch", "template_hash", "date"}}}

Writes take a file lock, read the file, merge the new entry and replace the file atomically
(``os.replace`` of a temporary file in the same folder), so concurrent writers never lose each
other's entries and readers never see half a file. A file that cannot be parsed is never
overwritten: reading or writing it raises :class:`CacheFileError` naming it, and it is left as it was.

Lookup order: the exact shape; then (``nearest``) the closest shape of the same family, dtype and
device, by Euclidean distance over the logarithms of the integer dimensions, where non-integer
dimensions (booleans, strings) must agree, and (with ``max_distance``) no farther than that; then
None (callers fall back to the family default).
A key that only one of the two shapes has (an optional dimension with a default, such as the GEMM's
``b_transposed``) is ignored for matching and only breaks ties.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import filelock

from autotune import families
from autotune.paths import default_cache_path
from kernels.device import device_facts
from kernels.family import Family, torch_dtype

FORMAT = 1
Entry = dict[str, Any]


class CacheFileError(ValueError):
    """A cache file that cannot be read as a cache: it is reported, never overwritten."""


def shape_key(shape: dict[str, Any]) -> str:
    """Canonical text of a shape: ``k=v`` pairs sorted by key, values as JSON (``b_transposed=true``)."""
    if not isinstance(shape, dict) or not shape:
        raise ValueError(f"a shape must be a non-empty dict, got {shape!r}")
    for k, v in shape.items():
        if not isinstance(k, str) or not isinstance(v, (bool, int, float, str)):
            raise TypeError(f"shape entry {k!r}: {v!r} is not a str key with a bool/int/float/str value")
    return ",".join(f"{k}={json.dumps(shape[k])}" for k in sorted(shape))


def entry_key(family_name: str, dtype: str, shape: dict[str, Any]) -> str:
    """The cache key of a (family, dtype, shape): ``gemm/float16/K=64,M=16,N=48``."""
    return f"{family_name}/{dtype}/{shape_key(shape)}"


def resolve_path(cache_path: str | os.PathLike | None) -> Path:
    """``cache_path``, or the current device's default cache file when None."""
    return default_cache_path() if cache_path is None else Path(cache_path)


def read(path: str | os.PathLike) -> dict[str, Entry]:
    """The entries of a cache file ({} when it does not exist); :class:`CacheFileError` when unreadable."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheFileError(f"cache file {path} is not valid JSON ({e}); it was left untouched") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        raise CacheFileError(
            f"cache file {path} is not a format-{FORMAT} best-config cache (a JSON object with 'format' and "
            f"'entries'); it was left untouched"
        )
    return data["entries"]


def write(path: str | os.PathLike, entries: list[Entry]) -> None:
    """Merge ``entries`` (each keyed by its family, dtype and shape) into the cache file at ``path``.

    Lock, read, merge, write a temporary file, ``os.replace``: atomic for readers and safe for
    concurrent writers. Entries of other keys are kept; an entry of the same key is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(f"{path}.lock", timeout=120):
        merged = read(path)
        for entry in entries:
            merged[entry_key(entry["family"], entry["dtype"], entry["shape"])] = entry
        text = json.dumps({"format": FORMAT, "entries": dict(sorted(merged.items()))}, indent=1, sort_keys=False)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def shape_distance(query: dict[str, Any], shape: dict[str, Any]) -> tuple[float, int] | None:
    """(log distance, keys only one side has) between two shapes; None when they cannot match."""
    shared = query.keys() & shape.keys()
    total = 0.0
    for k in shared:
        a, b = query[k], shape[k]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
        if numeric:
            total += (math.log(max(a, 1)) - math.log(max(b, 1))) ** 2
        elif a != b:
            return None
    if not any(isinstance(query[k], (int, float)) and not isinstance(query[k], bool) for k in shared):
        return None
    return math.sqrt(total), len(query.keys() ^ shape.keys())


def select(
    entries: dict[str, Entry],
    family_name: str,
    dtype: str,
    shape: dict[str, Any],
    *,
    nearest: bool = True,
    device_key: str | None = None,
    max_distance: float | None = None,
    accept: Callable[[Entry], bool] | None = None,
) -> Entry | None:
    """The entry for ``shape`` among ``entries`` (see the module docstring for the order), with
    ``"match"`` ("exact" or "nearest") and ``"distance"`` added; None when nothing matches.
    ``max_distance``: the farthest a nearest shape may be (None: any distance). ``accept``: entries
    it rejects (a config that ``shape`` cannot run) are passed over for the next nearest."""
    device_key = device_key or device_facts().key
    exact = entries.get(entry_key(family_name, dtype, shape))
    if exact is not None and exact.get("device_key", device_key) == device_key and (accept is None or accept(exact)):
        return {**exact, "match": "exact", "distance": 0.0}
    if not nearest:
        return None
    best: tuple[tuple[float, int, str], Entry] | None = None
    for key, entry in entries.items():
        if entry.get("family") != family_name or entry.get("dtype") != dtype:
            continue
        if entry.get("device_key", device_key) != device_key:
            continue
        d = shape_distance(shape, entry.get("shape", {}))
        if d is None or (max_distance is not None and d[0] > max_distance):
            continue
        if (best is None or (*d, key) < best[0]) and (accept is None or accept(entry)):
            best = ((*d, key), entry)
    if best is None:
        return None
    return {**best[1], "match": "nearest", "distance": best[0][0]}


def lookup(
    family: str | Family,
    shape: dict[str, Any],
    dtype: str,
    *,
    cache_path: str | os.PathLike | None = None,
    nearest: bool = True,
) -> Entry | None:
    """The cache entry for (family, shape, dtype) on this device: exact, else nearest shape, else None.

    The entry is a dict with the winner's ``"config"`` and its provenance (see the module
    docstring), plus ``"match"`` and ``"distance"``. ``cache_path`` None reads the current device's
    default file under ``results/cache/``.
    """
    fam = families.resolve(family)
    torch_dtype(dtype)
    shape_key(shape)
    return select(read(resolve_path(cache_path)), fam.name, dtype, shape, nearest=nearest)
