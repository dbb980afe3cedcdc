"""Bit packing of k-bit codes into bytes, with exact byte counts.

The reference packer treats a row of n codes as one little-endian bit stream: code i
occupies bits [i*k, (i+1)*k) of the row, bit 0 of a byte first. A row therefore takes
exactly ceil(n*k / 8) bytes, for any k from 1 to 8 (3-bit codes included: eight codes
fill three bytes).

    k = 4:  byte j = code[2j] | code[2j+1] << 4
    k = 2:  byte j = code[4j] | code[4j+1] << 2 | code[4j+2] << 4 | code[4j+3] << 6
    k = 3:  bytes 3j..3j+2 hold codes 8j..8j+7:  c0 c0 c0 c1 c1 c1 c2 c2 | c2 c3 c3 c3 ...

For k in (2, 4, 8), where codes never straddle a byte, a shift-and-or fast path produces
the same bytes; tests compare it with the bit-stream reference.
"""

from __future__ import annotations

import torch

from ..errors import LowbitError


def packed_row_bytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def _check(codes: torch.Tensor, bits: int) -> None:
    if not 1 <= bits <= 8:
        raise LowbitError(f"can only pack 1..8-bit codes, got {bits}")
    if codes.dtype != torch.uint8:
        raise LowbitError(f"codes must be uint8, got {codes.dtype}")


def pack_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [..., n] uint8 codes (< 2**bits) into [..., ceil(n*bits/8)] bytes, bit by bit."""
    _check(codes, bits)
    *lead, n = codes.shape
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(*lead, n * bits)
    nbytes = packed_row_bytes(n, bits)
    pad = nbytes * 8 - n * bits
    stream = torch.nn.functional.pad(stream, (0, pad))
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.int32)
    packed = (stream.reshape(*lead, nbytes, 8).to(torch.int32) * weights).sum(-1)
    return packed.to(torch.uint8)


def unpack_reference(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_reference: [..., ceil(n*bits/8)] bytes -> [..., n] uint8 codes."""
    _check(packed, bits)
    *lead, nbytes = packed.shape
    if nbytes != packed_row_bytes(n, bits):
        raise LowbitError(f"{nbytes} bytes cannot hold {n} codes of {bits} bits")
    stream = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    stream = stream.reshape(*lead, nbytes * 8)[..., : n * bits].reshape(*lead, n, bits)
    weights = (1 << torch.arange(bits, dtype=torch.int32)).to(torch.int32)
    return (stream.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def _pack_aligned(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    *lead, n = codes.shape
    pad = (-n) % per
    c = torch.nn.functional.pad(codes, (0, pad)).reshape(*lead, -1, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8)
    for i in range(per):
        out |= c[..., i] << (i * bits)
    return out


def _unpack_aligned(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along the last dimension (fast path where it exists)."""
    _check(codes, bits)
    if bits == 8:
        return codes.clone()
    if bits in (1, 2, 4):
        return _pack_aligned(codes, bits)
    return pack_reference(codes, bits)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack the last dimension of ``packed`` into n codes."""
    _check(packed, bits)
    if packed.shape[-1] != packed_row_bytes(n, bits):
        raise LowbitError(f"{packed.shape[-1]} bytes cannot hold {n} codes of {bits} bits")
    if bits == 8:
        return packed.clone()
    if bits in (1, 2, 4):
        return _unpack_aligned(packed, bits, n)
    return unpack_reference(packed, bits, n)
