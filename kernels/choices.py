"""What `kernels: auto` runs for each op, per device class: the implementation benchmarks/RESULTS.md measured faster.

The choice rests on the fwd+bwd rows (a training step runs every op with its backward) and compares the Triton op
with torch.compile of its eager twin, since compile is what a run uses to fuse the eager ops. Triton is chosen only
when it beat compile by more than TIE in every fwd+bwd row of the op: at build time the model knows its width and
dtype but not the rows per call (batch x tokens), and a choice that lost at one measured batch size could make
`auto` slower than compile. Ties go to the eager twin (simpler, and compile fuses it). Device classes without
measurements, and all non-CUDA devices, run eager. tests/test_kernel_ops.py re-derives this table from RESULTS.md.
"""
from __future__ import annotations

from typing import NamedTuple

# compile ms / Triton ms must exceed this in every row for Triton to count as faster; RESULTS.md calls 1.01 "level".
TIE = 1.05


class Choice(NamedTuple):
    impl: str      # 'eager' or 'triton'
    evidence: str  # the RESULTS.md rows ("All rows", mode fwd+bwd, column compile / Triton) behind impl


# Device class (a substring of torch.cuda.get_device_name) -> op -> choice.
AUTO: dict[str, dict[str, Choice]] = {
    "H100": {
        "layernorm_modulate": Choice(
            "eager", "compile/Triton 0.54-1.18 over 12 rows; won only fp32 L/2 and XL/2 at B=256 (1.18, 1.15), "
                     "lost both at B=32 (0.79, 0.89)"),
        "gated_residual": Choice(
            "eager", "compile/Triton 0.48-0.89 over 12 rows: never faster"),
        "gated_residual_layernorm_modulate": Choice(
            "eager", "compile/Triton 0.71-1.19 over 12 rows; won fp32 B/2 and L/2 at B=256 (1.16, 1.19) and XL/2 "
                     "at B=32 (1.10), lost the same regimes at the other batch (0.71, 0.77, 0.94)"),
        "fm_loss": Choice(
            "eager", "compile/Triton 0.71-0.81 over 4 rows (latent 4x32x32): never faster"),
        "consistency_loss": Choice(
            "eager", "compile/Triton 0.73-0.92 over 4 rows (latent 4x32x32): never faster"),
    },
}
