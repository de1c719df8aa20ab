"""The Core ML backend (extra ``coreml``): exports an ``.mlpackage`` (:mod:`.coreml_package`) and checks one
(:mod:`.coreml_check`); it builds nothing to run, since Core ML runs only on Apple platforms."""

from __future__ import annotations

import sys
from pathlib import Path

from .backend import Backend, ExportFormat, Run
from .coreml_check import check
from .coreml_package import NOT_RUN, PRECISIONS, write
from .machine import DeployError


class CoreML(Backend):
    name = "coreml"
    precisions = ()  # no in-process builds: Core ML does not run here
    refusal = f"{NOT_RUN}; export an .mlpackage with format 'coreml' and run it there"
    requires = ("coremltools",)
    extra = "coreml"
    formats = (ExportFormat("coreml", ".mlpackage", PRECISIONS, refusal="Core ML packages hold fp16, fp32 or "
                            "int8 weights", options=("metadata",), default_precision="fp16", runs_here=False,
                            weights_only_int8=True),)

    def available(self) -> bool:
        # find_spec, not an import: importing coremltools takes seconds and loads TensorFlow (import_coremltools)
        import importlib.util

        if "coremltools" in sys.modules:
            return sys.modules["coremltools"] is not None
        return importlib.util.find_spec("coremltools") is not None

    def describe(self, precision: str) -> str:
        return "Core ML (not run here)"

    def build(self, folded, precision, batches, batch_size, resolution, workdir) -> Run:
        raise DeployError(self.refusal)

    def save(self, folded, path, format, precision, batches, resolution, *, metadata=None) -> Path:
        return write(folded, path, precision, resolution, metadata or {})

    def load(self, path, format) -> Run:
        raise DeployError(f"{NOT_RUN}; mobilenets.deploy.check_exported(model, path) checks the package here")

    def check(self, path, format, reference, metadata, *, precision=None, images=None, logits=None,
              labels=None) -> dict:
        return check(path, reference, metadata, precision=precision, images=images, logits=logits, labels=labels)


BACKEND = CoreML()
