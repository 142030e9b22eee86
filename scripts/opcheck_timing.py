"""Where the time of ``torch.library.opcheck`` on the nanodit ops goes: one line per (op, test util) with its
seconds, and every ``--stack-every`` seconds a dump of the Python stacks (to ``--stacks``), so a case that runs
for minutes shows where it is. Diagnostic for the GPU kernel suite's slowest case (opcheck on the triton ops).

    python scripts/opcheck_timing.py --suffix _tt --stacks $OUT/opcheck_stacks.txt
"""

from __future__ import annotations

import argparse
import faulthandler
import time

import torch

from nanodit.kernels import get_ops

UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def cases(device: str) -> list[tuple[str, tuple]]:
    x = torch.randn(2, 5, 48, device=device, requires_grad=True)
    y = torch.randn(2, 5, 48, device=device)
    shift, scale, gate = (torch.randn(2, 48, device=device, requires_grad=True) for _ in range(3))
    v = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    x0 = torch.randn(2, 3, 4, 4, device=device)
    t = torch.rand(2, device=device)
    return [
        ("adaln_modulate", (x, shift, scale)),
        ("gated_residual", (x, gate, y)),
        ("residual_adaln_modulate", (x, y, gate, shift, scale)),
        ("residual_adaln_modulate", (x, y, None, shift, scale)),
        ("flow_loss", (v, x0, x0, t, None, 10, True)),
        ("flow_loss", (v.detach(), x0, x0, t, torch.rand(2, device=device), 3, False)),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suffix", default="_tt", help="'' for the custom ops, '_tt' for the triton ops")
    p.add_argument("--stacks", default="opcheck_stacks.txt")
    p.add_argument("--stack-every", type=float, default=30.0)
    p.add_argument("--utils", default=",".join(UTILS))
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    get_ops("triton")  # imports the kernel modules, which register torch.ops.nanodit.*
    with open(a.stacks, "w") as fh:
        faulthandler.dump_traceback_later(a.stack_every, repeat=True, file=fh)
        total = time.perf_counter()
        for i, (name, args) in enumerate(cases(device)):
            op = getattr(torch.ops.nanodit, name + a.suffix).default
            for util in a.utils.split(","):
                t0 = time.perf_counter()
                print(f"case {i} {name}{a.suffix} {util} ...", file=fh, flush=True)
                try:
                    torch.library.opcheck(op, args, test_utils=util)
                    status = "ok"
                except Exception as e:  # report and go on: the point is the timing of every case
                    status = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(
                    f"case {i} {name}{a.suffix:4s} {util:28s} {time.perf_counter() - t0:8.2f} s  {status}",
                    flush=True,
                )
        faulthandler.cancel_dump_traceback_later()
    print(f"total {time.perf_counter() - total:.1f} s")


if __name__ == "__main__":
    main()
