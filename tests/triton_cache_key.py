"""Pure-Python model of the response-cache key of Triton Inference Server 2.51 (r24.10).

Where each step comes from (read in the public sources, re-expressed here):

* triton-inference-server/core, branch r24.10, ``src/cache_manager.cc``:
  ``TritonCache::Hash`` starts from ``size_t seed = 0`` and folds in, with
  ``boost::hash_combine``: the request's model name (``std::string``), then
  ``ActualModelVersion()`` (``int64_t``), then ``HashInputs``.  ``HashInputs`` copies the
  request's inputs into a ``std::map`` (so they are visited sorted by name, byte order) and for
  each one folds in the input name (``std::string``) and then ``HashInputBuffers``, which walks
  every data buffer of the input and folds in *each byte on its own*
  (``hash_combine(*seed, unsigned char)``).  There is no separate per-buffer digest: the bytes go
  straight into the running seed.  The key string is ``std::to_string(seed)``.  Nothing else
  (shape, datatype, parameters, requested outputs) is part of the key.
* The boost version: triton-inference-server/server, branch r24.10, ``build.py`` writes the
  build-base Dockerfiles (both the Ubuntu and the RHEL one) so that they download
  ``boost_1_80_0.tar.gz`` and install its headers into ``/usr/include/boost``
  (core's ``src/CMakeLists.txt`` only asks for ``Boost 1.78``).  So the server is compiled
  against Boost 1.80.0.
* boostorg/container_hash, tag ``boost-1.80.0``, ``include/boost/container_hash/hash.hpp``
  (the pre-1.81 design):
  - ``hash_combine(seed, v)`` = ``hash_combine_impl<64>::fn(seed, boost::hash<T>()(v))`` on a
    64-bit ``size_t``, which is the MurmurHash2-64 step::

        k *= M; k ^= k >> 47; k *= M;   h ^= k; h *= M; h += 0xe6546b64     (mod 2**64)
        M = 0xc6a4a7935bd1e995

    (the ``seed ^= v + 0x9e3779b9 + (seed<<6) + (seed>>2)`` form is only the fallback for
    sizes other than 32 and 64 bits; boost >= 1.81 replaced all of this).
  - integers up to ``long`` (``unsigned char``, ``char``, ``int64_t`` = ``long`` on Linux)
    hash to ``static_cast<size_t>(v)``; ``char`` is signed, so bytes >= 0x80 of a name are
    sign-extended.
  - ``std::string`` hashes as ``hash_range(begin, end)``: a fresh seed 0 into which each char
    is ``hash_combine``-d; that value is then combined into the outer seed like any other.

``buffer_hash(data, seed)`` is therefore "the running seed after Triton has folded these bytes
in", and it depends on the seed the bytes start from (model name, version and the inputs sorted
before this one).  ``input_seed(model, version, name)`` gives the seed Triton has when it starts
on the bytes of the first input ``name`` of a request; ``buffer_hash(a, s) == buffer_hash(b, s)``
for that ``s`` makes every request to that model/version whose other inputs are equal share a key.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

MASK64 = (1 << 64) - 1
MURMUR_M = 0xC6A4A7935BD1E995
MURMUR_R = 47
MURMUR_ADD = 0xE6546B64

#: context of the planted collision in tests/data/cache_collision/pair.npz
COLLISION_MODEL = "support_encoder"
COLLISION_VERSION = 1
COLLISION_INPUT = "support_images"


def _mix(k: int) -> int:
    k = (k * MURMUR_M) & MASK64
    k ^= k >> MURMUR_R
    return (k * MURMUR_M) & MASK64


def hash_combine(seed: int, value_hash: int) -> int:
    """boost 1.80 ``hash_combine_impl<64>::fn(seed, value_hash)``."""
    return ((((seed ^ _mix(value_hash & MASK64)) * MURMUR_M) & MASK64) + MURMUR_ADD) & MASK64


# per byte value: the already mixed k of hash_combine(seed, (unsigned char) b)
_BYTE_K = np.array([_mix(b) for b in range(256)], dtype=np.uint64)


def string_hash(s: str | bytes) -> int:
    """boost 1.80 ``boost::hash<std::string>``: hash_range over (signed) chars from seed 0."""
    raw = s.encode() if isinstance(s, str) else bytes(s)
    seed = 0
    for c in raw:
        seed = hash_combine(seed, c - 256 if c >= 128 else c)  # char is signed, sign-extended
    return seed


def int64_hash(v: int) -> int:
    """boost 1.80 ``boost::hash<long>``: the value itself as size_t."""
    return v & MASK64


def buffer_hash(data: bytes, seed: int = 0) -> int:
    """Seed after ``HashInputBuffers`` folds every byte of ``data`` into ``seed``.

    Triton has no standalone buffer digest: the result depends on the starting seed; pass
    ``input_seed(model, version, input_name)`` to get the value Triton computes.
    """
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    ks = _BYTE_K[buf].tolist()
    h = seed & MASK64
    m, add, mask = MURMUR_M, MURMUR_ADD, MASK64
    for k in ks:
        h = (((h ^ k) * m) + add) & mask
    return h


def _as_bytes(arr) -> bytes:
    return np.ascontiguousarray(arr).tobytes()


def input_seed(model: str, version: int, name: str, earlier: Mapping[str, np.ndarray] | None = None) -> int:
    """Seed Triton holds right before the bytes of input ``name``.

    ``earlier``: the request's inputs whose names sort before ``name`` (none for the first).
    """
    seed = hash_combine(0, string_hash(model))
    seed = hash_combine(seed, int64_hash(version))
    for key in sorted(earlier or {}, key=lambda n: n.encode()):
        seed = hash_combine(seed, string_hash(key))
        seed = buffer_hash(_as_bytes(earlier[key]), seed)
    return hash_combine(seed, string_hash(name))


def request_key(model: str, version: int, inputs: Mapping[str, np.ndarray]) -> int:
    """Triton 2.51 ``TritonCache::Hash`` of a request (the key is ``str()`` of this number).

    ``version`` is the model version actually run (``ActualModelVersion``), not -1.
    """
    seed = hash_combine(0, string_hash(model))
    seed = hash_combine(seed, int64_hash(version))
    for name in sorted(inputs, key=lambda n: n.encode()):
        seed = hash_combine(seed, string_hash(name))
        seed = buffer_hash(_as_bytes(inputs[name]), seed)
    return seed


def collision_seed() -> int:
    """Starting seed the planted pair (``a``, ``b``) collides from."""
    return input_seed(COLLISION_MODEL, COLLISION_VERSION, COLLISION_INPUT)
