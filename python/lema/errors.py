"""The exceptions lema.from_pretrained raises for input it cannot use, each with one line that
names the file or setting and what to do. All are ValueError (TypeError for none)."""


class LemaError(ValueError):
    """Base of the errors below."""


class NotACheckpointError(LemaError):
    """The path is not a local Hugging Face checkpoint directory with safetensors weights, or
    its weights do not fit the architecture its config.json names."""


class UnknownArchitectureError(LemaError):
    """config.json names a model_type transformers has no causal language model for."""


class RemoteCodeError(LemaError):
    """The checkpoint brings its own model code and trust_remote_code=True was not passed."""


class BudgetTooSmallError(LemaError):
    """The budget cannot hold one op's weights at once; the message names the smallest that can."""


class DtypeError(LemaError):
    """A dtype other than the checkpoint's was asked for (it would read every weight at load)."""
