"""Small ``@triton.jit`` helpers shared by the kernels (import only with the Triton backend)."""

import triton
import triton.language as tl  # noqa: F401  (Triton requires it in a jit function's module)


@triton.jit
def unravel3(flat, size_h, size_w):
    """Row-major ``(d, h, w)`` coordinates of flat indices into a ``(*, size_h, size_w)`` box."""
    return flat // (size_w * size_h), (flat // size_w) % size_h, flat % size_w
