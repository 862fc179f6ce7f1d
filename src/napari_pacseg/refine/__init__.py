"""What the refinement runs on besides the kernels: the denoised guide and the local intensity fit."""
