"""@triton.jit versions of the torch operations whose Triton spelling differs, called by the
functions ``translate.py`` generates.

Integer ``//`` and ``%`` round toward zero in compiled Triton (as C) but toward minus
infinity under the interpreter (NumPy) and in torch: these give torch's floor semantics in both.
"""
import triton
import triton.language as tl


@triton.jit
def floordiv(a, b):
    """torch's ``a // b`` of integers (rounds toward minus infinity)."""
    q = a // b
    r = a - q * b
    # Truncated division left a remainder of the wrong sign: step down once.
    return q - ((r != 0) & ((r < 0) != (b < 0))).to(q.dtype)


@triton.jit
def remainder(a, b):
    """torch's ``a % b`` of integers (the sign of b)."""
    return a - floordiv(a, b) * b


@triton.jit
def truncdiv(a, b):
    """torch's ``torch.div(a, b, rounding_mode="trunc")`` of integers."""
    q = floordiv(a, b)
    r = a - q * b
    # Floor division of operands of opposite signs with a remainder is one below truncation.
    return q + ((r != 0) & ((a < 0) != (b < 0))).to(q.dtype)


@triton.jit
def fmod(a, b):
    """torch's ``torch.fmod`` of integers (the sign of a)."""
    return a - truncdiv(a, b) * b


@triton.jit
def ffloordiv(a, b):
    """torch's ``a // b`` of floats."""
    return tl.floor(a / b)


@triton.jit
def fremainder(a, b):
    """torch's ``a % b`` of floats."""
    return a - tl.floor(a / b) * b


@triton.jit
def ftruncdiv(a, b):
    """torch's ``torch.div(a, b, rounding_mode="trunc")`` of floats."""
    q = a / b
    return tl.where(q < 0, tl.ceil(q), tl.floor(q))


@triton.jit
def ffmod(a, b):
    """torch's ``torch.fmod`` of floats."""
    return a - ftruncdiv(a, b) * b


@triton.jit
def sign(x):
    """torch.sign as float: -1, 0 or 1."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
