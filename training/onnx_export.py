"""A PyTorch module written to ONNX only once ONNX Runtime gives what PyTorch gives: the step every export
shares (a model's decoder, training/export.py; the judge, training/judge_export.py)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.atomic import atomic_path

PARITY_SAMPLES = 256
EXAMPLE_BATCH = 4        # >= 2: an example batch of 1 can fix the batch axis to 1 (pytorch #133653)


class ExportError(Exception):
    """An export that failed a check; the message names the run or file."""


def export_checked(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], output: str,
                   path: Path, check: tuple[torch.Tensor, ...], tolerance: float) -> int:
    """Write `module` (eval mode, float32 on the CPU) to `path` atomically, with a dynamic batch axis,
    once ONNX Runtime's CPU output on `check` matches PyTorch's within `tolerance` (max absolute
    difference); returns the opset. The inputs are named `names`, the output `output`."""
    import onnx
    import onnxruntime as ort

    batch = torch.export.Dim("batch", min=1)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # it warns about torchvision ops we do not use
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, UserWarning))  # torch's exporter internals, not ours
        program = torch.onnx.export(module, example, input_names=names, output_names=[output], dynamo=True,
                                    dynamic_shapes={name: {0: batch} for name in names}, verbose=False)
    with atomic_path(path) as tmp:
        assert program is not None  # None only for the legacy exporter (dynamo=False)
        program.save(str(tmp))
        with torch.no_grad():
            expected = module(*check).numpy()
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run([output], dict(zip(names, (t.numpy() for t in check))))[0]
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        if not diff <= tolerance:
            raise ExportError(f"{path.name}: ONNX Runtime differs from PyTorch by {diff:.3g} "
                              f"(> {tolerance:g}) over {len(check[0])} samples; not written")
        opset = next(o.version for o in onnx.load(str(tmp)).opset_import if o.domain in ("", "ai.onnx"))
    return opset
