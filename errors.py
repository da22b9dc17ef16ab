"""Every error a user can cause, in one place. Each is a ToolkitError: the scripts print its message on one line
and exit with code 2 (cli.main_wrapper); anything else is a bug and keeps its traceback.

Each message names the file, key, flag or URL at fault and says what to do."""


class ToolkitError(Exception):
    """A problem the user can fix: the message says what and how."""


class ConfigError(ToolkitError):
    """A config file or a flag: a missing or unknown key, a wrong type, a value out of range."""


class InputError(ToolkitError):
    """The documents, the eval file or another input cannot be used as given."""


class LLMFatalError(ToolkitError):
    """A model server problem that no retry can fix: a rejected key, an unknown model, no server at the URL."""


class ServerUnreachable(LLMFatalError):
    """Nothing answers at a server's address (after the retries): it is not running, or -u is wrong."""


class GenerationError(ToolkitError):
    """The model in this process failed while writing an answer (inf or NaN logits, a prompt too long to allocate):
    that answer ends, the chatbot goes on."""


class OutputError(ToolkitError):
    """Results could not be written: a full disk, a folder without write permission, another run holding it."""


class DataError(ToolkitError):
    """The training data, the tokenizer or the model cannot be used for fine-tuning."""


class CheckpointError(DataError):
    """A checkpoint folder that cannot be resumed from or converted."""
