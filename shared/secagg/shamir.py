"""Shamir secret sharing of whole 32-byte secrets over the prime field GF(2^521 - 1).

What it owns: splitting a device's two round secrets (its X25519 mask key s_u and its self-mask
seed b_u) into shares for its neighbours, and rebuilding them from any t shares.

Why this prime: a share must carry a *full* 32-byte secret, so the field needs more than 2^256
elements. 2^255 - 19 (the Curve25519 prime) is too small: a uniformly random 32-byte b_u is
>= that prime about half the time, and reducing it would change the seed. The Mersenne prime
2^521 - 1 is the smallest well-known prime comfortably above 2^256 whose primality nobody has to
take on trust; shares are 66 bytes (vs 33 for a 257-bit prime), a few kilobytes per device in
all. Field elements are Python ints: this is arithmetic, not a cipher.

Rules it keeps: polynomial coefficients come only from the injected random source, drawn
uniformly by rejection (no modulo bias); x-coordinates are 1..n (roster position + 1), never 0;
Lagrange coefficients at 0 are cached per x-set (pure function of the xs, safe to memoize).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from fleetlearn.shared.secagg.errors import CryptoError, ThresholdError
from fleetlearn.shared.secagg.keys import RandomSource, draw

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32
_TOP_BYTE_MASK = 0x01  # 521 = 65*8 + 1: keep one bit of the first byte


def random_element(random: RandomSource) -> int:
    """A uniform element of GF(p) by rejection: 521 random bits, redrawn in the rare case >= p."""
    while True:
        raw = bytearray(draw(random, SHARE_BYTES))
        raw[0] &= _TOP_BYTE_MASK
        value = int.from_bytes(raw, "big")
        if value < PRIME:  # fails only for the single value 2^521 - 1
            return value


def split(
    secrets: Sequence[bytes], xs: Sequence[int], threshold: int, random: RandomSource
) -> list[tuple[int, ...]]:
    """Shares of every secret at every x: result[j][i] is secret i's share at xs[j].

    Each secret gets an independent random polynomial of degree threshold-1 with the secret as
    constant term; any `threshold` shares determine it, fewer reveal nothing about it.
    """
    if threshold < 1:
        raise ValueError("threshold must be >= 1")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share x-coordinates must be distinct and non-zero")
    polynomials: list[list[int]] = []
    for secret in secrets:
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"secrets are {SECRET_BYTES} bytes")
        coefficients = [int.from_bytes(secret, "big")]
        coefficients += [random_element(random) for _ in range(threshold - 1)]
        polynomials.append(coefficients)
    result = []
    for x in xs:
        row = []
        for coefficients in polynomials:
            acc = 0
            for c in reversed(coefficients):  # Horner
                acc = (acc * x + c) % PRIME
            row.append(acc)
        result.append(tuple(row))
    return result


@lru_cache(maxsize=4096)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Coefficients l_i with f(0) = sum l_i f(x_i) for every polynomial of degree < len(xs).

    l_i = prod_{j != i} x_j / (x_j - x_i). The divisions use one modular inversion for all of
    them (Montgomery's batch trick); the set of share holders repeats across secrets, hence
    the cache.
    """
    numerator = 1
    for x in xs:
        numerator = numerator * x % PRIME
    denominators = []
    for i, xi in enumerate(xs):
        d = xi  # folds the division of the numerator by x_i into the same inversion
        for j, xj in enumerate(xs):
            if j != i:
                d = d * (xj - xi) % PRIME
        denominators.append(d)
    prefix = [1]
    for d in denominators:
        prefix.append(prefix[-1] * d % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    inverses = [0] * len(denominators)
    for i in range(len(denominators) - 1, -1, -1):
        inverses[i] = inverse * prefix[i] % PRIME
        inverse = inverse * denominators[i] % PRIME
    return tuple(numerator * inv % PRIME for inv in inverses)


def reconstruct(points: Sequence[tuple[int, int]], threshold: int) -> int:
    """f(0) from (x, f(x)) points; uses the `threshold` points with the smallest x.

    Choosing a canonical subset makes the Lagrange cache hit whenever the same holders answer.
    """
    if len(points) < threshold:
        raise ThresholdError(f"{len(points)} share(s) available, {threshold} needed")
    chosen = sorted(points)[:threshold]
    xs = tuple(x for x, _ in chosen)
    if len(set(xs)) != len(xs):
        raise CryptoError("two shares claim the same x-coordinate")
    coefficients = lagrange_at_zero(xs)
    return sum(c * y for c, (_, y) in zip(coefficients, chosen, strict=True)) % PRIME


def encode_share(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    """A share value off the wire; CryptoError unless it is a canonical field element."""
    if len(data) != SHARE_BYTES:
        raise CryptoError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise CryptoError("share value is not below the field prime")
    return value


def secret_from_element(value: int) -> bytes:
    """The 32-byte secret a reconstruction yields; CryptoError if it cannot be one (bad share)."""
    if not 0 <= value < 1 << (8 * SECRET_BYTES):
        raise CryptoError("shares reconstruct to a value wider than 32 bytes (a share is bad)")
    return value.to_bytes(SECRET_BYTES, "big")
