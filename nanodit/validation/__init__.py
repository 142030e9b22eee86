"""Validation: the plan's three tests on trained weights, their scores, the GO / NO-GO / INCOMPLETE decision
with a diagnosis, the self-test with planted faults, and the report.

    from nanodit.validation import Validator
    v = Validator(cfg, manifest, groups, device)          # once per run: cases, decoder, LPIPS
    result = v.run(model, step, out_dir, run_dir, self_test=True)

Modules, in the order a validation runs: ``cases`` (which samples each test uses), ``sampling`` (the Euler
sampler over all cases, the condition-effect probe), ``tools`` (decoders, LPIPS, DINOv3 embedder),
``scoring`` (records per case, pass rates), ``metrics`` (PSNR/SSIM/LPIPS, loss ratio, Wilson intervals),
``criteria`` (the decision and its diagnosis), ``selftest`` (planted faults), ``report`` (files and
TensorBoard), ``validator`` (the Validator), ``cli`` (``python -m nanodit.validate``).
"""

from nanodit.validation.cases import TESTS, Case, read_val_samples, select_cases
from nanodit.validation.validator import ValidateError, Validator, run_validation, write_final

__all__ = [
    "TESTS",
    "Case",
    "ValidateError",
    "Validator",
    "read_val_samples",
    "run_validation",
    "select_cases",
    "write_final",
]
