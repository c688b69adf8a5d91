"""The one exception type for bad user input.

Every message is a single line that names the problem and how to fix it; the CLI prints it without a traceback.
"""


class UpcycleError(ValueError):
    """Bad input (a recipe, a model config, a checkpoint): the message says what is wrong and what to do."""
