"""Text in, token batches out.

- Sources: files or directories (every non-binary file under them, in sorted order), or with
  none given the default corpus: this Python installation's standard-library sources (every
  installation has them, no network), a deterministic first few MB in sorted path order.
  Every file must be UTF-8 text: a binary file, or one with more than 1% invalid bytes, is a
  DataError naming it (a few stray bytes become U+FFFD with a warning); so is an empty corpus.
- Tokenizers: "byte" (UTF-8 bytes, vocabulary 256) or "char" (the corpus's distinct characters).
- Cache: tokenized once into train.bin / val.bin (numpy memmaps) + meta.json under a directory
  named by a hash of the sources (paths, sizes, mtimes) and the tokenizer; written to a temp
  directory and renamed, so concurrent ranks or a crash never leave a half-written cache.
- Documents: each input file is a document; with a doc_separator, each piece of a file between
  separators is one (the separator itself is dropped, empty pieces are skipped). The token
  stream is the documents joined by "\n" (so each document ends with a newline, its end-of-text
  mark); the cache stores each split's document start offsets next to its tokens.
- Split: the last val_fraction of the tokens is validation.
- Batches: each DP rank owns a disjoint contiguous shard of each split and draws its windows
  from it with a generator seeded by (seed, split, dp_rank, iteration, micro-step): a batch is
  a pure function of its position in training, so resuming needs no data-loader state.
  Packed batches (packed=True) are the same windows plus their document layout: every document
  (cut at the window's edges too) is its own causal sequence with positions from 0, and targets
  that begin a new document are ignore_index (nothing predicts a document from the previous one).
"""
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lmkernels.train.errors import DataError

# 2: files are checked for binary and non-UTF-8 content (older caches were not)
# 3: document start offsets are stored (train_doc_starts.npy / val_doc_starts.npy); empty files
#    no longer add a lone "\n" to the stream
CACHE_VERSION = 3
IGNORE_INDEX = -1  # target value the models' losses skip (GPT and Llama use -1)
# a file with more than this share of bytes that are not UTF-8 is refused (binary, or another
# encoding: random bytes are ~50% invalid, Latin-1 prose a few percent, and training on U+FFFD
# teaches nothing); below it, the stray bad bytes become U+FFFD with a warning.
MAX_INVALID_UTF8_SHARE = 0.01
DEFAULT_CORPUS_BYTES = 4 * 1024 * 1024
# standard-library folders left out of the default corpus: tests, data-heavy or generated code
_STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip",
                "turtledemo", "__pycache__", "encodings", "pydoc_data", "config-3", "unicodedata"}


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def state(self) -> dict:
        return {"kind": "byte"}


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self._index = {c: i for i, c in enumerate(chars)}

    def encode(self, text: str) -> list:
        try:
            return [self._index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"char tokenizer: character {e.args[0]!r} is not in its vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids if int(i) < self.vocab_size)

    def state(self) -> dict:
        return {"kind": "char", "chars": self.chars}


def tokenizer_from_state(state: dict):
    if state["kind"] == "byte":
        return ByteTokenizer()
    if state["kind"] == "char":
        return CharTokenizer(state["chars"])
    raise ValueError(f"unknown tokenizer {state['kind']!r}; expected 'byte' or 'char'")


def default_corpus_files(limit_bytes: int = DEFAULT_CORPUS_BYTES) -> list:
    """The first limit_bytes of the standard library's .py files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith("config-"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                files.append(path)
                total += path.stat().st_size
                if total >= limit_bytes:
                    return files
    if not files:
        raise FileNotFoundError(f"default corpus: no .py files found under the standard library at {root}")
    return files


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(8192)


def resolve_files(data: Sequence[str]) -> list:
    """Files named, plus every text file under directories named, sorted; clear errors otherwise."""
    files = []
    for item in data:
        path = Path(item).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(path).parts))
            found = [p for p in found if _is_text(p)]
            if not found:
                raise FileNotFoundError(f"data: directory {str(path)!r} contains no text files")
            files.extend(found)
        else:
            raise FileNotFoundError(f"data: {str(path)!r} does not exist (give text files or a directory, "
                                    f"or leave data empty for the default corpus)")
    return files


def default_cache_dir() -> Path:
    base = os.environ.get("LMK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lmkernels")
    return Path(base) / "data"


@dataclass
class TokenData:
    train: np.ndarray  # memmap of token ids
    val: np.ndarray
    tokenizer: object
    meta: dict
    # sorted int64 offsets of the tokens that begin a document, per split (0 included when the
    # split starts with a document; a document cut by the train/val split starts val at 0 too)
    train_doc_starts: np.ndarray = None
    val_doc_starts: np.ndarray = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def prepare_data(data: Sequence[str], tokenizer: str = "byte", val_fraction: float = 0.1,
                 cache_dir=None, verbose: bool = True, doc_separator: str = "") -> TokenData:
    """Tokenizes the sources once into the memmap cache (or reuses it) and opens it."""
    if tokenizer not in ("byte", "char"):
        raise ValueError(f"tokenizer must be 'byte' or 'char'; got {tokenizer!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    if not isinstance(doc_separator, str):
        raise TypeError(f"doc_separator must be a string; got {type(doc_separator).__name__}")
    files = resolve_files(data) if data else default_corpus_files()
    key = hashlib.sha256(json.dumps([CACHE_VERSION, tokenizer, val_fraction, doc_separator] + [
        (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / f"{tokenizer}-{key}"
    if not (target / "meta.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
        try:
            _tokenize(files, tokenizer, val_fraction, doc_separator, tmp, verbose)
            try:
                os.replace(tmp, target)
            except OSError:  # another process finished first: theirs is identical
                if not (target / "meta.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((target / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return TokenData(train=np.memmap(target / "train.bin", dtype=dtype, mode="r"),
                     val=np.memmap(target / "val.bin", dtype=dtype, mode="r"),
                     tokenizer=tokenizer_from_state(meta["tokenizer"]), meta=meta,
                     train_doc_starts=np.load(target / "train_doc_starts.npy"),
                     val_doc_starts=np.load(target / "val_doc_starts.npy"))


def read_text_file(path: Path, verbose: bool = True) -> str:
    """The file as text; binary or non-UTF-8 files are refused with the share of bad bytes."""
    raw = path.read_bytes()
    if b"\0" in raw:
        raise DataError(f"data: {str(path)!r} is a binary file (it contains NUL bytes); give UTF-8 text files")
    text = raw.decode("utf-8", errors="replace")
    # each invalid byte (or truncated sequence) became one U+FFFD; genuine U+FFFD are EF BF BD in raw
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    if replaced:
        share = replaced / len(raw)
        if share > MAX_INVALID_UTF8_SHARE:
            raise DataError(f"data: {str(path)!r} is not UTF-8 text: {share:.1%} of its bytes are invalid "
                            f"UTF-8 (at most {MAX_INVALID_UTF8_SHARE:.0%} is accepted); convert it, e.g. "
                            f"iconv -f latin1 -t utf-8")
        if verbose:
            print(f"data: warning: {str(path)!r}: {replaced} bytes ({share:.2%}) are not valid UTF-8 and are "
                  f"read as U+FFFD")
    return text


def split_documents(texts, doc_separator: str = "") -> list:
    """The documents in these file texts: one per non-empty file, or with a separator one per
    non-empty piece between separators."""
    pieces = (t.split(doc_separator) if doc_separator else [t] for t in texts)
    return [doc for piece in pieces for doc in piece if doc]


def _tokenize(files, tokenizer: str, val_fraction: float, doc_separator: str, out: Path, verbose: bool):
    texts = [read_text_file(p, verbose) for p in files]
    if not any(texts):
        raise DataError(f"data: the {len(files)} file(s) given contain no text ({str(files[0])!r}"
                        f"{', ...' if len(files) > 1 else ''}); give non-empty UTF-8 text files")
    docs = split_documents(texts, doc_separator)
    if not docs:
        raise DataError(f"data: the files contain nothing but the doc_separator {doc_separator!r}; "
                        f"give text between the separators")
    text = "\n".join(docs)
    tok = ByteTokenizer() if tokenizer == "byte" else CharTokenizer("".join(sorted(set(text))))
    ids = np.array(tok.encode(text), dtype=np.int64)
    # both tokenizers encode a concatenation as the concatenation of the encodings, so a
    # document's token count is its own encoding's length (+1 for the joining "\n")
    lengths = [len(d.encode("utf-8")) if tokenizer == "byte" else len(d) for d in docs]
    doc_starts = np.cumsum([0] + [n + 1 for n in lengths[:-1]], dtype=np.int64)
    dtype = np.uint8 if tok.vocab_size <= 256 else np.uint16 if tok.vocab_size <= 65536 else np.uint32
    n_val = max(int(len(ids) * val_fraction), 1)
    if n_val >= len(ids):  # an empty split cannot even be opened (numpy cannot mmap an empty file)
        raise DataError(f"data: {len(ids)} token(s) in all ({str(files[0])!r}{', ...' if len(files) > 1 else ''}) "
                        f"leave nothing for training after the validation split; give more text")
    n_train = len(ids) - n_val
    ids[:-n_val].astype(dtype).tofile(out / "train.bin")
    ids[-n_val:].astype(dtype).tofile(out / "val.bin")
    train_starts = doc_starts[doc_starts < n_train]
    # the document that the split cuts starts the validation split again
    val_starts = np.union1d([0], doc_starts[doc_starts >= n_train] - n_train).astype(np.int64)
    np.save(out / "train_doc_starts.npy", train_starts)
    np.save(out / "val_doc_starts.npy", val_starts)
    meta = {"tokenizer": tok.state(), "dtype": np.dtype(dtype).name, "files": len(files),
            "chars": len(text), "train_tokens": int(n_train), "val_tokens": int(n_val),
            "doc_separator": doc_separator, "train_documents": len(train_starts),
            "val_documents": len(val_starts), "first_file": str(files[0]), "last_file": str(files[-1])}
    (out / "meta.json").write_text(json.dumps(meta))
    if verbose:
        print(f"data: tokenized {len(files)} files ({len(docs):,} documents, {len(text) / 1e6:.1f}M chars) with "
              f"the {tokenizer} tokenizer: {meta['train_tokens']:,} train / {n_val:,} val tokens -> {out.parent}")


def pack_windows(window_starts, doc_starts: np.ndarray, block_size: int):
    """The document layout of windows x = tokens[s:s + block_size], y = tokens[s + 1:s + block_size + 1]
    for s in window_starts, given the sorted offsets of the tokens that begin a document.

    Returns (ignore (B, T) bool: targets that begin a document, PackedDocuments): each window
    starts a document, and so does every document start inside it."""
    from lmkernels.models._causal_lm import PackedDocuments

    T = block_size
    ignore = np.zeros((len(window_starts), T), dtype=bool)
    positions = np.empty((len(window_starts), T), dtype=np.int64)
    cu, arange = [], np.arange(T)
    for row, s in enumerate(window_starts):
        inside = doc_starts[np.searchsorted(doc_starts, s + 1):np.searchsorted(doc_starts, s + T, "right")] - s
        ignore[row, inside - 1] = True  # y[p] is token s + p + 1: p = start - 1 (start = T included)
        seg = np.concatenate(([0], inside[inside < T]))  # the documents' first tokens in x
        lengths = np.diff(np.append(seg, T))
        positions[row] = arange - np.repeat(seg, lengths)
        cu.append(row * T + seg)
    cu = np.append(np.concatenate(cu), len(window_starts) * T)
    packing = PackedDocuments(cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
                              max_seqlen=int(np.diff(cu).max()), position_ids=torch.from_numpy(positions))
    return torch.from_numpy(ignore), packing


class BatchSampler:
    """Deterministic (x, y) batches of this DP rank's shard; see the module docstring."""

    def __init__(self, data: TokenData, block_size: int, batch_size: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1):
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.dp_rank = dp_rank
        self.shards, self.doc_starts = {}, {}
        for split, tokens in (("train", data.train), ("val", data.val)):
            length = len(tokens) // dp_size
            if length < block_size + 2:
                raise DataError(
                    f"data: the {split} split has {len(tokens):,} tokens, {length:,} per data-parallel rank "
                    f"(dp={dp_size}); block_size {block_size} needs at least {block_size + 2} per rank: "
                    f"give more text or a smaller block_size")
            lo, hi = dp_rank * length, (dp_rank + 1) * length
            self.shards[split] = tokens[lo:hi]
            starts = getattr(data, f"{split}_doc_starts")
            if starts is not None:  # this shard's document starts, as offsets into the shard
                self.doc_starts[split] = starts[(starts >= lo) & (starts < hi)] - lo

    def get_batch(self, split: str, iteration: int, micro_step: int = 0, *, packed: bool = False):
        """The batch of training step `iteration`, micro-step `micro_step`: (x, y), or with
        packed=True (x, y, PackedDocuments) where y is IGNORE_INDEX at targets that begin a document."""
        return self._batch(split, 0, iteration, micro_step, packed)

    def eval_batch(self, split: str, k: int, *, packed: bool = False):
        """Evaluation batch k: the same at every evaluation, apart from the training batches."""
        return self._batch(split, 1, k, 0, packed)

    def _batch(self, split: str, stream: int, iteration: int, micro_step: int, packed: bool):
        shard = self.shards[split]
        # a tuple of ints hashes the same in every process and run (strings would not: hash
        # randomization), so the split goes in as a number
        which = ("train", "val").index(split)
        g = torch.Generator().manual_seed(
            hash((self.seed, which, stream, self.dp_rank, iteration, micro_step)) & 0x7FFF_FFFF_FFFF_FFFF)
        starts = torch.randint(len(shard) - self.block_size - 1, (self.batch_size,), generator=g).tolist()
        rows = np.stack([shard[s:s + self.block_size + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if not packed:
            return x, y
        if split not in self.doc_starts:
            raise DataError("data: packed batches need the documents' starts, which this TokenData lacks "
                            "(build it with prepare_data)")
        ignore, packing = pack_windows(starts, self.doc_starts[split], self.block_size)
        if bool(ignore.all()):  # the mean loss would be 0 / 0
            raise DataError(f"data: every target of a packed {split} batch begins a document: the documents are "
                            f"1 token long (check doc_separator); packed training needs longer documents")
        # not in place: with batch_size 1, x and y are views of one row (.contiguous() copies nothing)
        return x, y.masked_fill(ignore, IGNORE_INDEX), packing
