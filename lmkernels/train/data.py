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
- Split: the last val_fraction of the tokens is validation.
- Batches: each DP rank owns a disjoint contiguous shard of each split and draws its windows
  from it with a generator seeded by (seed, split, dp_rank, iteration, micro-step): a batch is
  a pure function of its position in training, so resuming needs no data-loader state.
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

CACHE_VERSION = 2  # 2: files are checked for binary and non-UTF-8 content (older caches were not)
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

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def prepare_data(data: Sequence[str], tokenizer: str = "byte", val_fraction: float = 0.1,
                 cache_dir=None, verbose: bool = True) -> TokenData:
    """Tokenizes the sources once into the memmap cache (or reuses it) and opens it."""
    if tokenizer not in ("byte", "char"):
        raise ValueError(f"tokenizer must be 'byte' or 'char'; got {tokenizer!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    files = resolve_files(data) if data else default_corpus_files()
    key = hashlib.sha256(json.dumps([CACHE_VERSION, tokenizer, val_fraction] + [
        (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / f"{tokenizer}-{key}"
    if not (target / "meta.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
        try:
            _tokenize(files, tokenizer, val_fraction, tmp, verbose)
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
                     tokenizer=tokenizer_from_state(meta["tokenizer"]), meta=meta)


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


def _tokenize(files, tokenizer: str, val_fraction: float, out: Path, verbose: bool):
    texts = [read_text_file(p, verbose) for p in files]
    text = "\n".join(texts)
    if not any(texts):
        raise DataError(f"data: the {len(files)} file(s) given contain no text ({str(files[0])!r}"
                        f"{', ...' if len(files) > 1 else ''}); give non-empty UTF-8 text files")
    tok = ByteTokenizer() if tokenizer == "byte" else CharTokenizer("".join(sorted(set(text))))
    ids = np.array(tok.encode(text), dtype=np.int64)
    dtype = np.uint8 if tok.vocab_size <= 256 else np.uint16 if tok.vocab_size <= 65536 else np.uint32
    n_val = max(int(len(ids) * val_fraction), 1)
    if n_val >= len(ids):  # an empty split cannot even be opened (numpy cannot mmap an empty file)
        raise DataError(f"data: {len(ids)} token(s) in all ({str(files[0])!r}{', ...' if len(files) > 1 else ''}) "
                        f"leave nothing for training after the validation split; give more text")
    ids[:-n_val].astype(dtype).tofile(out / "train.bin")
    ids[-n_val:].astype(dtype).tofile(out / "val.bin")
    meta = {"tokenizer": tok.state(), "dtype": np.dtype(dtype).name, "files": len(files),
            "chars": len(text), "train_tokens": int(len(ids) - n_val), "val_tokens": int(n_val),
            "first_file": str(files[0]), "last_file": str(files[-1])}
    (out / "meta.json").write_text(json.dumps(meta))
    if verbose:
        print(f"data: tokenized {len(files)} files ({len(text) / 1e6:.1f}M chars) with the {tokenizer} "
              f"tokenizer: {meta['train_tokens']:,} train / {n_val:,} val tokens -> {out.parent}")


class BatchSampler:
    """Deterministic (x, y) batches of this DP rank's shard; see the module docstring."""

    def __init__(self, data: TokenData, block_size: int, batch_size: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1):
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.dp_rank = dp_rank
        self.shards = {}
        for split, tokens in (("train", data.train), ("val", data.val)):
            length = len(tokens) // dp_size
            if length < block_size + 2:
                raise DataError(
                    f"data: the {split} split has {len(tokens):,} tokens, {length:,} per data-parallel rank "
                    f"(dp={dp_size}); block_size {block_size} needs at least {block_size + 2} per rank: "
                    f"give more text or a smaller block_size")
            self.shards[split] = tokens[dp_rank * length:(dp_rank + 1) * length]

    def get_batch(self, split: str, iteration: int, micro_step: int = 0):
        """The batch of training step `iteration`, micro-step `micro_step`."""
        return self._batch(split, 0, iteration, micro_step)

    def eval_batch(self, split: str, k: int):
        """Evaluation batch k: the same at every evaluation, apart from the training batches."""
        return self._batch(split, 1, k, 0)

    def _batch(self, split: str, stream: int, iteration: int, micro_step: int):
        shard = self.shards[split]
        # a tuple of ints hashes the same in every process and run (strings would not: hash
        # randomization), so the split goes in as a number
        which = ("train", "val").index(split)
        g = torch.Generator().manual_seed(
            hash((self.seed, which, stream, self.dp_rank, iteration, micro_step)) & 0x7FFF_FFFF_FFFF_FFFF)
        starts = torch.randint(len(shard) - self.block_size - 1, (self.batch_size,), generator=g).tolist()
        rows = np.stack([shard[s:s + self.block_size + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
