"""The prepared image store: every source radiograph decoded and resized once into 1-channel uint8 shards.

    python -m train.data.prepare SOURCE_DIR --out OUT_DIR [--size 512] [--num-proc N] [--shard-size 512]
                                 [--no-draft] [--overwrite]

Decoding a full-size MIMIC-CXR-JPG image (about 2,500 x 3,000 px) and resizing it costs tens of ms of CPU, so a
16-core machine feeds only a few hundred images/s to training. This module pays that cost once: every
``*.jpg *.jpeg *.png *.dcm`` under SOURCE_DIR (recursive, symlinks followed, sorted by relative POSIX path) is
decoded with the model's own grayscale rule (`load_grayscale`), resized so the long side is ``--size`` with the
aspect kept (`AnatomyVLMImageProcessor.resized_size`, bilinear + antialias, never upscaled) and stored as uint8.
Training then reads the pixels from memory-mapped shards (`PreparedImages`) in microseconds.

The store (OUT_DIR):

    plan.json            format, size, draft, shard size, source root, source count, sha256 of the ordered source
                         list. Written first; a resume with another plan is refused.
    shard-00000.u8       shard i holds sources [i * shard_size, (i + 1) * shard_size): their pixels concatenated,
                         row-major, height * width bytes each.
    shard-00000.json     per source {path, offset, height, width, original_height, original_width, source_bytes,
                         source_mtime_ns, source_blake2b} or, for a file that cannot be read, {path, error}; plus
                         the .u8's sha256. The commit marker of the shard: written (as .partial, fsynced) and renamed
                         after the .u8, so a shard whose json exists is complete.
    manifest.jsonl       every source in plan order (shard entries plus "shard"), written when all shards are done.
    bad_files.txt        ``path<TAB>error`` per unreadable source.
    prepared.json        format, size, draft, images, bad, shards, source_root: written last, its presence marks a
                         complete store.

A run killed at any point resumes from its committed shards (stray .partial files are deleted) and ends with the
same bytes as an uninterrupted run: nothing in the shards or manifest.jsonl depends on time or on OUT_DIR.

JPEGs are decoded in draft mode by default: libjpeg scales by 1/2, 1/4 or 1/8 in the DCT domain to the smallest
size still >= the target, which is several times faster than a full decode, and the antialiased resize from there
differs from the full decode's by about a uint8 level (``--no-draft`` decodes at full size;
``python -m train.bench.decode`` measures both).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1
SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")
JPEG_SUFFIXES = (".jpg", ".jpeg")
DEFAULT_SIZE = 512
DEFAULT_SHARD_SIZE = 512
DELAY_ENV = "ANATOMY_VLM_PREPARE_DELAY"  # seconds slept before each shard: lets tests kill a run mid-way
PLAN, MANIFEST, BAD_FILES, PREPARED = "plan.json", "manifest.jsonl", "bad_files.txt", "prepared.json"
PLAN_KEYS = ("format", "size", "draft", "shard_size", "source_root", "sources", "sources_sha256")
MAX_OPEN_SHARDS = 128  # memory maps each hold a file descriptor: bound them well below the usual limit of 1024


class PrepareError(RuntimeError):
    """The output folder cannot be used for this run (another plan, or a store this code does not know)."""


# ------------------------------------------------------------------------------------------------- sources
def find_sources(root: Path) -> list[str]:
    """Relative POSIX paths of every image under `root`, sorted; directory symlinks are followed (loops skipped).

    One `os.scandir` per directory and no file is opened or stat-ed: suffixes come from the names, file-ness from
    the directory entry, so 377k files take seconds."""
    root = Path(root)
    found: list[str] = []
    root_stat = os.stat(root)
    # (folder, its relative prefix, the (dev, inode) of it and its ancestors: a symlink back up is a loop)
    stack = [(str(root), "", frozenset({(root_stat.st_dev, root_stat.st_ino)}))]
    while stack:
        folder, prefix, ancestors = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            raise OSError(f"{folder}: cannot list the folder ({err})") from err
        for entry in entries:
            try:
                if entry.is_dir():
                    info = entry.stat()
                    key = (info.st_dev, info.st_ino)
                    if key not in ancestors:
                        stack.append((entry.path, f"{prefix}{entry.name}/", ancestors | {key}))
                elif entry.name.lower().endswith(SUFFIXES) and entry.is_file():
                    found.append(prefix + entry.name)
            except OSError:  # a dangling symlink or an entry removed meanwhile: not a source
                continue
    found.sort()
    return found


def sources_sha256(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------- one image
def target_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The stored size: the processor's `resized_size` at `size` (long side = size, aspect kept), never upscaled."""
    if max(height, width) <= size:
        return height, width
    return _processor(size).resized_size(height, width)


@functools.lru_cache(maxsize=4)
def _processor(size: int):
    from modeling_anatomy_vlm.image_processing_anatomy_vlm import AnatomyVLMImageProcessor

    return AnatomyVLMImageProcessor(size=size)


def resize_to_uint8(gray: np.ndarray, height: int, width: int,
                    content: tuple[float, float] | None = None) -> np.ndarray:
    """Float [0, 1] `[H, W]` -> uint8 `[height, width]` with the processor's resize (bilinear, antialias).

    `content`: the (height, width), in pixels of `gray`, that the original image spans when it is smaller than
    `gray`'s own size. A JPEG draft decode at 1/s yields ceil(W / s) columns for W / s columns of image (the last
    one is partly the encoder's edge padding); resizing all of them to the target would stretch the geometry by up
    to a target pixel at the far edges. The scale factor target / content, passed as is, maps output pixel centres
    exactly where the full-size resize puts them, and the extra output rows and columns are cut."""
    import torch
    import torch.nn.functional as F

    image = torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))[None, None]
    if content is not None and tuple(content) != tuple(gray.shape):
        factors = []
        for inside, length, target in zip(gray.shape, content, (height, width)):
            factor = target / length
            while math.floor(inside * factor) < target:  # floating-point rounding: torch sizes the output so
                factor = math.nextafter(factor, math.inf)
            factors.append(factor)
        image = F.interpolate(image, scale_factor=tuple(factors), mode="bilinear", antialias=True,
                              align_corners=False, recompute_scale_factor=False)[..., :height, :width]
    elif gray.shape != (height, width):
        image = F.interpolate(image, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return (image[0, 0] * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def decode_resized(path: Path, data: bytes, size: int, draft: bool) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 `[h, w]` stored pixels, original (H, W)) of one source file whose bytes are `data`.

    JPEGs are decoded from `data` (read once, also hashed), in draft mode when `draft`; other files go through
    `load_grayscale(path)` (PNG, 16-bit, DICOM with its LUTs). Raises `ImageLoadError` naming the file."""
    from PIL import Image, UnidentifiedImageError

    from modeling_anatomy_vlm.image_processing_anatomy_vlm import MIN_IMAGE_SIDE, ImageLoadError, load_grayscale

    name = str(path)
    if path.suffix.lower() in JPEG_SUFFIXES and data[:3] == b"\xff\xd8\xff":
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.filename = name  # load_grayscale's errors name the file
                original = (image.height, image.width)
                if min(original) < MIN_IMAGE_SIDE:  # checked here: draft mode would shrink it further
                    raise ImageLoadError(f"{name}: image is {original[1]}x{original[0]} px, smaller than "
                                         f"{MIN_IMAGE_SIDE} px")
                height, width = target_size(*original, size)
                content = None
                if draft and (height, width) != original:
                    # DCT-domain 1/2, 1/4 or 1/8 reduction, still >= the target; box = the image's extent in it
                    reduced = image.draft("L", (width, height))
                    content = None if reduced is None else (reduced[1][3], reduced[1][2])
                image.load()
                gray = load_grayscale(image)
        except ImageLoadError:
            raise
        except UnidentifiedImageError as err:
            raise ImageLoadError(f"{name}: not a JPEG image file ({err})") from err
        except Image.DecompressionBombError as err:
            raise ImageLoadError(f"{name}: refused, too many pixels ({err})") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageLoadError(f"{name}: corrupt or truncated image ({err})") from err
    else:
        gray = load_grayscale(path)  # a .jpg that is no JPEG gets load_grayscale's own error
        original, content = gray.shape, None
        height, width = target_size(*original, size)
    return resize_to_uint8(gray, height, width, content), (int(original[0]), int(original[1]))


def _error_message(path: Path, err: Exception) -> str:
    message = str(err) or type(err).__name__
    return message if str(path) in message else f"{path}: {message} ({type(err).__name__})"


def prepare_image(path: Path, rel: str, size: int, draft: bool) -> tuple[dict, np.ndarray | None]:
    """(manifest entry without offset, pixels) of one source; a file that cannot be used gives {path, error}."""
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            data = handle.read()
        pixels, (original_height, original_width) = decode_resized(path, data, size, draft)
    except Exception as err:  # noqa: BLE001 - every failure of one file is recorded, never fatal to the run
        return {"path": rel, "error": _error_message(path, err)}, None
    entry = {"path": rel, "offset": 0, "height": int(pixels.shape[0]), "width": int(pixels.shape[1]),
             "original_height": original_height, "original_width": original_width,
             "source_bytes": int(info.st_size), "source_mtime_ns": int(info.st_mtime_ns),
             "source_blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}
    return entry, pixels


# ------------------------------------------------------------------------------------------------- one shard
def shard_name(index: int, suffix: str) -> str:
    return f"shard-{index:05d}{suffix}"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ShardJob:
    index: int
    paths: tuple[str, ...]
    source_root: str
    out: str
    size: int
    draft: bool


def prepare_shard(job: ShardJob) -> tuple[int, int, int]:
    """Decode, resize and commit one shard (see the module docstring); returns (index, sources, good images)."""
    delay = float(os.environ.get(DELAY_ENV) or 0)
    if delay > 0:
        time.sleep(delay)
    out, root = Path(job.out), Path(job.source_root)
    u8_path, json_path = out / shard_name(job.index, ".u8"), out / shard_name(job.index, ".json")
    u8_partial, json_partial = Path(f"{u8_path}.partial"), Path(f"{json_path}.partial")
    entries, offset, digest = [], 0, hashlib.sha256()
    with open(u8_partial, "wb") as handle:
        for rel in job.paths:
            entry, pixels = prepare_image(root / rel, rel, job.size, job.draft)
            if pixels is not None:
                raw = pixels.tobytes()
                entry["offset"] = offset
                handle.write(raw)
                digest.update(raw)
                offset += len(raw)
            entries.append(entry)
        handle.flush()
        os.fsync(handle.fileno())
    record = {"format": FORMAT, "shard": job.index, "u8_bytes": offset, "u8_sha256": digest.hexdigest(),
              "images": entries}
    with open(json_partial, "w") as handle:
        json.dump(record, handle, indent=0)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(u8_partial, u8_path)
    os.replace(json_partial, json_path)  # the commit
    _fsync_dir(out)
    return job.index, len(entries), sum("error" not in e for e in entries)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core: intra-op threads would only oversubscribe


# ------------------------------------------------------------------------------------------------- the store
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PrepareError(f"{path}: cannot be read as JSON ({err}); use --overwrite to start the store again") from err


def _store_files(out: Path) -> list[Path]:
    """The files of a prepared store in `out` (finished or not); nothing else there is ever touched."""
    names = (PLAN, MANIFEST, BAD_FILES, PREPARED)
    files = []
    for entry in os.scandir(out):
        name = entry.name
        base = name[: -len(".partial")] if name.endswith(".partial") else name[: -len(".tmp")] if name.endswith(
            ".tmp") else name
        if base in names or (base.startswith("shard-") and base.endswith((".u8", ".json"))):
            files.append(Path(entry.path))
    return files


def _start(out: Path, plan: dict, overwrite: bool) -> None:
    """Make `out` ready for `plan`: new, resumed (same plan) or emptied (--overwrite); refuse another plan."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in _store_files(out):
            path.unlink()
    plan_path = out / PLAN
    if plan_path.is_file():
        old = _read_json(plan_path)
        if old != plan:
            changed = [k for k in PLAN_KEYS if old.get(k) != plan.get(k)]
            details = ", ".join(f"{k}: {old.get(k)!r} -> {plan.get(k)!r}" for k in changed if k != "sources_sha256")
            if "sources_sha256" in changed and "sources" not in changed:
                details = ", ".join(filter(None, [details, "the list of source files differs"]))
            raise PrepareError(f"{out} holds a prepared store of another plan ({details}); use --overwrite to replace "
                               "it or choose another --out")
    else:
        leftovers = [p.name for p in _store_files(out) if not p.name.endswith((".partial", ".tmp"))]
        if leftovers:
            raise PrepareError(f"{out} holds prepared-store files ({', '.join(sorted(leftovers)[:3])}) but no "
                               f"{PLAN}; use --overwrite to replace them or choose another --out")
        _write_atomic(plan_path, json.dumps(plan, indent=1) + "\n")
    for path in _store_files(out):
        if path.name.endswith((".partial", ".tmp")):
            path.unlink()  # a killed run's uncommitted files


def _shard_done(out: Path, index: int, source_root: Path) -> bool:
    """A committed shard whose sources are unchanged: its json exists, its .u8 has the bytes the json counts, and
    every image it stored still has its recorded size and mtime (a source rewritten under the same name, e.g. a
    regenerated phantom set, has its shard done again)."""
    json_path = out / shard_name(index, ".json")
    if not json_path.is_file():
        return False
    record = _read_json(json_path)
    u8_path = out / shard_name(index, ".u8")
    if not (u8_path.is_file() and u8_path.stat().st_size == record.get("u8_bytes")):
        return False
    for entry in record["images"]:
        if "error" in entry:
            continue
        try:
            st = os.stat(source_root / entry["path"])
        except OSError:
            return False
        if (st.st_size, st.st_mtime_ns) != (entry["source_bytes"], entry["source_mtime_ns"]):
            return False
    return True


def _finish(out: Path, plan: dict, num_shards: int) -> dict:
    """manifest.jsonl, bad_files.txt, then prepared.json (the mark of a complete store) from the shard jsons."""
    lines, bad, images, shard_bytes = [], [], 0, 0
    for index in range(num_shards):
        record = _read_json(out / shard_name(index, ".json"))
        shard_bytes += record["u8_bytes"]
        for entry in record["images"]:
            lines.append(json.dumps({**entry, "shard": index}))
            if "error" in entry:
                bad.append(f"{entry['path']}\t{' '.join(entry['error'].split())}")
            else:
                images += 1
    if len(lines) != plan["sources"]:
        raise PrepareError(f"{out}: the shards list {len(lines)} sources, the plan {plan['sources']}; use --overwrite")
    _write_atomic(out / MANIFEST, "".join(line + "\n" for line in lines))
    _write_atomic(out / BAD_FILES, "".join(line + "\n" for line in bad))
    prepared = {"format": FORMAT, "size": plan["size"], "draft": plan["draft"], "images": images, "bad": len(bad),
                "shards": num_shards, "source_root": plan["source_root"]}
    _write_atomic(out / PREPARED, json.dumps(prepared, indent=1) + "\n")
    return {**prepared, "shard_bytes": shard_bytes}


def prepare(source_dir, out, size: int = DEFAULT_SIZE, num_proc: int | None = None,
            shard_size: int = DEFAULT_SHARD_SIZE, draft: bool = True, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Create, resume or finish the prepared store of `source_dir` in `out`; returns prepared.json's figures plus
    ``shard_bytes``, ``seconds`` and ``prepared_now`` (images decoded by this call)."""
    from tqdm import tqdm

    start = time.perf_counter()
    source_root = Path(source_dir).resolve()
    if not source_root.is_dir():
        raise FileNotFoundError(f"{source_dir}: source folder does not exist")
    if size < 32:
        raise ValueError(f"--size must be >= 32 (the smallest image side the model reads), got {size}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    num_proc = max(1, num_proc or os.cpu_count() or 1)
    out = Path(out)
    sources = find_sources(source_root)
    if not sources:
        raise FileNotFoundError(f"{source_root}: no {' '.join('*' + s for s in SUFFIXES)} files under it")
    plan = {"format": FORMAT, "size": int(size), "draft": bool(draft), "shard_size": int(shard_size),
            "source_root": str(source_root), "sources": len(sources), "sources_sha256": sources_sha256(sources)}
    _start(out, plan, overwrite)

    num_shards = -(-len(sources) // shard_size)
    jobs = [ShardJob(i, tuple(sources[i * shard_size:(i + 1) * shard_size]), str(source_root), str(out), size, draft)
            for i in range(num_shards) if not _shard_done(out, i, source_root)]
    todo = sum(len(job.paths) for job in jobs)
    with tqdm(total=todo, unit="img", desc="prepare", disable=not progress or not todo, smoothing=0.1) as bar:
        if num_proc == 1 or len(jobs) <= 1:
            for job in jobs:
                bar.update(prepare_shard(job)[1])
        else:
            pool = ProcessPoolExecutor(min(num_proc, len(jobs)), initializer=_worker_init)
            try:
                pending = {pool.submit(prepare_shard, job) for job in jobs}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        bar.update(future.result()[1])
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    summary = _finish(out, plan, num_shards)
    summary.update(seconds=time.perf_counter() - start, prepared_now=todo)
    return summary


# ------------------------------------------------------------------------------------------------- reading
_ENTRY_FIELDS = ("shard", "offset", "height", "width", "original_height", "original_width", "source_bytes",
                 "source_mtime_ns")


def _path_keys(paths: list[str]) -> np.ndarray:
    """`[n, 2]` uint64: the 128-bit BLAKE2b of each relative path (the lookup key; collisions taken as never)."""
    digests = b"".join(hashlib.blake2b(p.encode("utf-8", "surrogateescape"), digest_size=16).digest() for p in paths)
    return np.frombuffer(digests, dtype="<u8").reshape(len(paths), 2)


class PreparedImages:
    """A complete prepared store, read-only: source path -> its stored uint8 pixels and original size.

    The index is two numpy arrays (a sorted 128-bit hash of each relative path, and 8 int64 fields per image: about
    80 bytes an image, 30 MB for MIMIC-CXR-JPG), so it pickles quickly into DataLoader workers; shards are memory
    mapped lazily, per process, at most `MAX_OPEN_SHARDS` at a time."""

    def __init__(self, folder: Path, info: dict, keys: np.ndarray, table: np.ndarray):
        self.folder = Path(folder)
        self.info = info
        self.size = int(info["size"])
        self.source_root = Path(info["source_root"])
        self._root = str(self.source_root)
        self._keys, self._table = keys, table  # keys sorted by (hi, lo); table rows follow them
        self._maps: dict[int, np.memmap] = {}

    @classmethod
    def open(cls, folder) -> PreparedImages:
        """Read prepared.json and manifest.jsonl of the store in `folder` (FileNotFoundError if not complete)."""
        folder = Path(folder)
        info_path = folder / PREPARED
        if not info_path.is_file():
            raise FileNotFoundError(f"{folder}: not a complete prepared image store ({PREPARED} is missing); run "
                                    "python -m train.data.prepare")
        info = json.loads(info_path.read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"{folder}: prepared store format {info.get('format')}, this code reads {FORMAT}; "
                             "prepare the images again")
        paths, rows = [], []
        with open(folder / MANIFEST, encoding="utf-8") as handle:
            for line in handle:
                entry = json.loads(line)
                if "error" not in entry:
                    paths.append(entry["path"])
                    rows.append(tuple(entry[k] for k in _ENTRY_FIELDS))
        keys = _path_keys(paths)
        table = np.array(rows, dtype=np.int64).reshape(len(rows), len(_ENTRY_FIELDS))
        order = np.lexsort((keys[:, 1], keys[:, 0]))
        return cls(folder, info, np.ascontiguousarray(keys[order]), np.ascontiguousarray(table[order]))

    def __len__(self) -> int:
        return len(self._table)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}  # memory maps are reopened by each process that reads
        return state

    def _relative(self, path) -> str | None:
        """The source-root-relative POSIX path of `path` (absolute, or relative to the source root or the working
        directory); None when it is not under the source root."""
        path = os.fspath(path)
        if not os.path.isabs(path):
            rel = os.path.normpath(path)
            if not rel.startswith(".." + os.sep) and rel != ".." and self._row(Path(rel).as_posix()) is not None:
                return Path(rel).as_posix()
            path = os.path.abspath(path)
        for candidate in (os.path.normpath(path), None):
            if candidate is None:
                candidate = os.path.realpath(path)  # the path reaches the source root through a symlink
            if candidate.startswith(self._root + os.sep):
                return Path(candidate[len(self._root) + 1:]).as_posix()
        return None

    def _row(self, rel: str) -> int | None:
        hi, lo = _path_keys([rel])[0]
        start = int(np.searchsorted(self._keys[:, 0], hi, side="left"))
        while start < len(self._keys) and self._keys[start, 0] == hi:
            if self._keys[start, 1] == lo:
                return start
            start += 1
        return None

    def _shard(self, index: int) -> np.memmap:
        shard = self._maps.pop(index, None)
        if shard is None:
            if len(self._maps) >= MAX_OPEN_SHARDS:
                self._maps.pop(next(iter(self._maps)))  # the least recently used
            shard = np.memmap(self.folder / shard_name(index, ".u8"), dtype=np.uint8, mode="r")
        self._maps[index] = shard  # most recently used last
        return shard

    def get(self, path) -> tuple[np.ndarray, tuple[int, int]] | None:
        """(uint8 `[height, width]` stored pixels, (original_height, original_width)) of the source image at
        `path`, or None when the store does not hold it or the file changed since (size or mtime differ): the
        caller then decodes the file itself."""
        rel = self._relative(path)
        row = None if rel is None else self._row(rel)
        if row is None:
            return None
        shard, offset, height, width, original_height, original_width, nbytes, mtime_ns = self._table[row].tolist()
        try:
            info = os.stat(os.path.join(self._root, rel))
        except OSError:
            return None
        if info.st_size != nbytes or info.st_mtime_ns != mtime_ns:
            return None
        pixels = np.array(self._shard(shard)[offset:offset + height * width]).reshape(height, width)
        return pixels, (original_height, original_width)


# ------------------------------------------------------------------------------------------------- CLI
def _folder_bytes(out: Path) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(out) if entry.is_file())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m train.data.prepare",
        description="Decode and resize every chest X-ray under SOURCE_DIR once into uint8 shards that training "
                    "reads instead of the source files (set data.prepared_dir=OUT_DIR).")
    parser.add_argument("source_dir", metavar="SOURCE_DIR", type=Path,
                        help="folder of *.jpg *.jpeg *.png *.dcm images, searched recursively (e.g. MIMIC-CXR-JPG's "
                             "2.0.0/ folder)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the prepared store (resumed if present)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help="long side of the stored images in px (>= the model's input size; default %(default)s)")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count(),
                        help="decoding processes (default: all cores, %(default)s)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help="images per shard file (default %(default)s)")
    parser.add_argument("--no-draft", dest="draft", action="store_false",
                        help="decode JPEGs at full size (slower; default: libjpeg draft mode, 1/2-1/8 scaling)")
    parser.add_argument("--overwrite", action="store_true", help="delete a store of another plan in --out first")
    args = parser.parse_args(argv)
    try:
        summary = prepare(args.source_dir, args.out, size=args.size, num_proc=args.num_proc,
                          shard_size=args.shard_size, draft=args.draft, overwrite=args.overwrite)
    except (PrepareError, FileNotFoundError, ValueError) as err:
        parser.exit(2, f"prepare: error: {err}\n")
    seconds, now = summary["seconds"], summary["prepared_now"]
    rate = f"{now / seconds:,.0f} images/s" if now else "nothing left to prepare"
    print(f"prepared {summary['images']:,} images ({summary['bad']:,} bad files, listed in "
          f"{args.out / BAD_FILES}) in {seconds:,.1f} s, {rate}; {_folder_bytes(args.out) / 1e9:.2f} GB in "
          f"{args.out}. To train from it: set data.prepared_dir={args.out}", file=sys.stdout)
    return summary


if __name__ == "__main__":
    main()
