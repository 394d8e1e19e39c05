"""On-disk store of precomputed reference log-probs, keyed by a fingerprint of everything that determines them.

A fingerprint is a sha256 over named parts — the reference weights (:func:`model_fingerprint`), the tokenizer
(:func:`tokenizer_fingerprint`), the dataset content (:func:`dataset_fingerprint`), ``max_length``, the
truncation mode, the refinement prompt, the log-prob semantics (temperature, softcap, sum/average), ... —
so a change in any part gives a new key and never a stale hit.

:class:`RefLogpsStore` keeps one safetensors file per (name, fingerprint) in ``cache_dir``. Writes are atomic
(a temp file in the same directory, fsync, ``os.replace``), so a reader sees the old file or the new one. Every
file carries its fingerprint and a sha256 of its tensors in the safetensors metadata; a torn or corrupt file
is reported with a warning and loads as ``None`` (recompute), never as garbage. Temp files left by writers that
died mid-write (their pid is gone on this host, or older than :data:`STALE_TEMP_SECONDS`) are removed when a
store opens; :meth:`RefLogpsStore.check_writable` fails early, before a reference pass whose result could not
be saved.

Mismatch policy (``on_mismatch``), for a ``load`` that finds files of the same name but none with the asked
fingerprint (the cache was computed for other weights, data or settings):

* ``"recompute"`` (default): warn, naming the parts that changed when known, and return ``None``;
* ``"raise"``: raise :class:`StaleReferenceCacheError` (for runs that must not recompute silently).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MISMATCH_POLICIES = ("recompute", "raise")
#: A temp file this old is a dead writer's, whatever its pid says (another host, a pid reused).
STALE_TEMP_SECONDS = 30 * 60
_META_FINGERPRINT = "fastpref_fingerprint"
_META_CHECKSUM = "fastpref_checksum"
_META_PARTS = "fastpref_parts"
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_TEMP = re.compile(r"\..+-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[^-]*\.tmp")
# Config entries that do not change what the model computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset")


class StaleReferenceCacheError(ValueError):
    """The cache directory holds reference log-probs computed for a different fingerprint."""


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _feed(digest, value: Any) -> None:
    """Feed a canonical, type-tagged encoding of ``value`` into ``digest``."""
    if value is None or isinstance(value, (bool, int, str)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, float):
        digest.update(f"float:{value!r};".encode())
    elif isinstance(value, bytes):
        digest.update(b"bytes:%d;" % len(value) + value)
    elif isinstance(value, torch.Tensor):
        digest.update(f"tensor:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(_tensor_bytes(value))
    elif isinstance(value, Mapping):
        digest.update(b"dict:%d;" % len(value))
        for key in sorted(value, key=str):
            _feed(digest, str(key))
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(b"list:%d;" % len(value))
        for item in value:
            _feed(digest, item)
    else:
        raise TypeError(f"cannot fingerprint a {type(value).__name__}; pass strings, numbers, tensors, lists "
                        f"or dicts (or a digest from model_/tokenizer_/dataset_fingerprint)")


def _digest(value: Any) -> str:
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def fingerprint_parts(**parts: Any) -> dict[str, str]:
    """The sha256 of each named part (what :meth:`RefLogpsStore.save` records to explain a later mismatch)."""
    return {name: _digest(value) for name, value in sorted(parts.items())}


def fingerprint(**parts: Any) -> str:
    """A stable sha256 (hex) over named parts: strings, numbers, None, bools, bytes, tensors, lists, dicts."""
    if not parts:
        raise ValueError("fingerprint needs at least one named part")
    return _digest(fingerprint_parts(**parts))


def model_fingerprint(model: torch.nn.Module, *, exclude: tuple[str, ...] = (),
                      state: Mapping[str, torch.Tensor] | None = None) -> str:
    """sha256 of a model's config (when it has one; entries that do not change what it computes left out) and
    every parameter and buffer, by name and value, except those whose name contains one of ``exclude`` (e.g. a
    peft adapter's ``.default.``: the base model's fingerprint without its adapters). ``state``, when given,
    replaces ``model.state_dict()`` (the weights under other names, e.g. a peft base's own)."""
    config = getattr(model, "config", None)
    config_dict = {}
    if config is not None:
        if hasattr(config, "to_json_string"):
            config_dict = json.loads(config.to_json_string(use_diff=False))
        else:
            config_dict = dict(vars(config))
        for key in _VOLATILE_CONFIG_KEYS:
            config_dict.pop(key, None)
    digest = hashlib.sha256()
    _feed(digest, json.dumps(config_dict, sort_keys=True, default=str))
    for name, tensor in (model.state_dict(keep_vars=False) if state is None else state).items():
        if any(marker in name for marker in exclude):
            continue
        _feed(digest, name)
        _feed(digest, tensor)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary, merges, normalization, special tokens, chat template and class.

    For a key over text data, where the token ids are not hashed: the class stays in it, since a class may encode
    in Python beyond its backend spec (a tokenizer without a ``backend_tokenizer`` is fingerprinted by its
    vocabulary alone). The trainer's cache hashes every row's token ids instead
    (:func:`fastpref.trainer.ref_cache.cache_fingerprint`), so it needs no tokenizer part."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # runtime call settings, not the tokenizer
        spec.pop("padding", None)
    else:
        spec = {"vocab": tokenizer.get_vocab()}
    return _digest({
        "class": type(tokenizer).__name__,
        "spec": json.dumps(spec, sort_keys=True),
        "special_tokens": {str(k): str(v) for k, v in tokenizer.special_tokens_map.items()},
        "chat_template": getattr(tokenizer, "chat_template", None) or "",
    })


def dataset_fingerprint(dataset, *, batch_size: int = 1024) -> str:
    """sha256 of a dataset's content in order: a ``datasets.Dataset`` (its selected rows and columns) or a list
    of dict rows. Independent of the storage layout (chunks, cache files) and of ``batch_size`` (how many rows
    are read at a time: each row is digested on its own), dependent on every value."""
    digest = hashlib.sha256()
    if isinstance(dataset, list):
        rows = iter(dataset)
    elif hasattr(dataset, "iter") and hasattr(dataset, "column_names"):
        digest.update(json.dumps(sorted(dataset.column_names)).encode())
        rows = (dict(zip(batch, values)) for batch in dataset.iter(batch_size=batch_size)
                for values in zip(*batch.values()))
    else:
        raise TypeError(f"dataset must be a datasets.Dataset or a list of dicts, got {type(dataset).__name__}")
    for row in rows:
        encoded = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode()
        digest.update(b"%d;" % len(encoded) + encoded)
    return digest.hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of named tensors (dtype, shape and bytes of each; the order of the names does not matter)."""
    return _digest({name: tensors[name] for name in sorted(tensors)})


class RefLogpsStore:
    """Reference log-probs on disk: one ``{name}-{fingerprint}.safetensors`` file per key (module docstring).

    ``load(fp, name=...)`` returns the saved ``dict[str, torch.Tensor]`` (CPU) or None (missing, stale under
    ``on_mismatch="recompute"``, torn or corrupt); ``save(fp, tensors, name=..., parts=...)`` writes atomically.
    ``name`` separates the caches of different datasets (``"train"``, ``"eval"``) in one directory; ``parts``
    (from :func:`fingerprint_parts`) lets a later mismatch say which part changed.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, on_mismatch: str = "recompute"):
        if on_mismatch not in MISMATCH_POLICIES:
            raise ValueError(f"on_mismatch must be one of {MISMATCH_POLICIES}, got {on_mismatch!r}")
        self.cache_dir = Path(cache_dir)
        self.on_mismatch = on_mismatch
        self._remove_stale_temps()

    def check_writable(self) -> None:
        """Raise ``OSError`` naming ``cache_dir`` if a file cannot be written there (call it before computing what
        :meth:`save` will write)."""
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(dir=self.cache_dir, prefix=f".probe-{_HOST}-{os.getpid()}-",
                                             suffix=".tmp")
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            raise OSError(error.errno, f"ref_cache_dir {str(self.cache_dir)!r} is not writable "
                                       f"({error.strerror or error}): the reference log-probs could not be saved; "
                                       "set ref_cache_dir to a writable directory") from error

    def _remove_stale_temps(self) -> None:
        """Delete temp files of writers that died mid-write: a dead pid of this host, or older than
        :data:`STALE_TEMP_SECONDS`."""
        if not self.cache_dir.is_dir():
            return
        now = time.time()
        for path in self.cache_dir.glob(".*.tmp"):
            match = _TEMP.fullmatch(path.name)
            try:
                old = now - path.stat().st_mtime > STALE_TEMP_SECONDS
            except FileNotFoundError:  # its writer just renamed or removed it
                continue
            dead = match is not None and match["host"] == _HOST and not _pid_alive(int(match["pid"]))
            if old or dead:
                path.unlink(missing_ok=True)

    def path(self, fp: str, *, name: str = "ref_logps") -> Path:
        """Where the tensors of fingerprint ``fp`` under ``name`` live."""
        if not isinstance(fp, str) or not fp or not all(c in "0123456789abcdef" for c in fp):
            raise ValueError(f"fp must be a hex fingerprint string (from fingerprint()), got {fp!r}")
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise ValueError(f"name must be a plain file-name part, got {name!r}")
        return self.cache_dir / f"{name}-{fp}.safetensors"

    def load(self, fp: str, *, name: str = "ref_logps", parts: Mapping[str, str] | None = None
             ) -> dict[str, torch.Tensor] | None:
        """The tensors saved under ``fp`` and ``name``, or None (see the class docstring)."""
        path = self.path(fp, name=name)
        if not path.exists():
            self._check_stale(fp, name, parts)
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # a torn or foreign file: any parse failure means "not a valid cache"
            warnings.warn(f"reference cache {path} is unreadable ({type(error).__name__}: {error}); recomputing",
                          RuntimeWarning, stacklevel=2)
            return None
        if metadata.get(_META_FINGERPRINT) != fp or metadata.get(_META_CHECKSUM) != tensors_digest(tensors):
            warnings.warn(f"reference cache {path} fails its fingerprint/checksum check (corrupt); recomputing",
                          RuntimeWarning, stacklevel=2)
            return None
        return tensors

    def save(self, fp: str, tensors: Mapping[str, torch.Tensor], *, name: str = "ref_logps",
             parts: Mapping[str, str] | None = None) -> Path:
        """Write ``tensors`` under ``fp`` and ``name`` atomically; returns the file's path."""
        from safetensors.torch import save_file

        path = self.path(fp, name=name)
        if not tensors:
            raise ValueError("tensors is empty: nothing to save")
        cpu = {}
        for key, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"tensors[{key!r}] must be a torch.Tensor, got {type(tensor).__name__}")
            cpu[key] = tensor.detach().to("cpu").contiguous()
        metadata = {_META_FINGERPRINT: fp, _META_CHECKSUM: tensors_digest(cpu),
                    _META_PARTS: json.dumps(dict(parts or {}), sort_keys=True)}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{name}-{_HOST}-{os.getpid()}-", suffix=".tmp")
        os.close(handle)
        try:
            save_file(cpu, temp, metadata=metadata)
            with open(temp, "rb") as written:
                os.fsync(written.fileno())
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return path

    def _check_stale(self, fp: str, name: str, parts: Mapping[str, str] | None) -> None:
        own = self.path(fp, name=name).name
        pattern = re.compile(re.escape(name) + r"-[0-9a-f]+\.safetensors")
        others = sorted(p for p in self.cache_dir.glob("*.safetensors") if pattern.fullmatch(p.name) and p.name != own)
        if not others:
            return
        changed = self._changed_parts(others[-1], parts)
        message = (f"reference cache {name!r} in {self.cache_dir} was computed for a different fingerprint "
                   f"({others[-1].name})" + (f"; changed parts: {', '.join(changed)}" if changed else ""))
        if self.on_mismatch == "raise":
            raise StaleReferenceCacheError(message + " (on_mismatch='raise')")
        logger.info(message + "; recomputing")

    @staticmethod
    def _changed_parts(path: Path, parts: Mapping[str, str] | None) -> list[str]:
        if not parts:
            return []
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                saved = json.loads((handle.metadata() or {}).get(_META_PARTS, "{}"))
        except Exception:
            return []
        return sorted(key for key in set(saved) | set(parts) if saved.get(key) != parts.get(key))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


__all__ = ["MISMATCH_POLICIES", "RefLogpsStore", "StaleReferenceCacheError", "dataset_fingerprint", "fingerprint",
           "fingerprint_parts", "model_fingerprint", "tensors_digest", "tokenizer_fingerprint"]
