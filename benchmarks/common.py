"""What every in-process benchmark on the embedded model starts with."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def smollm2_setup(threads: int) -> SimpleNamespace:
    """smollm2-135m in float32 with the protocol's windows and its cached float reference:
    model, tok, info, protocol, evals, calib, ref (Reference), base (the float EvalResult)."""
    torch.set_num_threads(threads)
    import lowbit
    from lowbit.calibration.data import Protocol

    protocol = Protocol()
    model, tok, info = lowbit.load("smollm2-135m")
    evals, calib = lowbit.prepare_windows(tok, protocol)
    ref, base = lowbit.reference_for(model, info["source"]["fingerprint"], evals, protocol, progress=False)
    return SimpleNamespace(model=model, tok=tok, info=info, protocol=protocol, evals=evals, calib=calib, ref=ref, base=base)
