"""edgesparse: training-free activation sparsity for LLM decoding on edge devices."""
__version__ = "0.1.0"

from .errors import (ArtifactError, BackendUnavailableError, EdgeSparseError, EmptyDataError,  # noqa: E402
                     FingerprintMismatchError, InvalidOptionError, ModelFilesError, UnsupportedModelError)
from .api import LLM, load  # noqa: E402
from .sparsity.calibrate import calibrate  # noqa: E402
from .sampling import SamplingParams  # noqa: E402

__all__ = ["load", "calibrate", "LLM", "SamplingParams", "EdgeSparseError", "ModelFilesError", "UnsupportedModelError",
           "BackendUnavailableError", "InvalidOptionError", "ArtifactError", "FingerprintMismatchError",
           "EmptyDataError", "__version__"]
