"""The one exception type a stage turns into a clear message and exit code 1."""


class PipelineError(Exception):
    """A problem with the user's input, data or environment, explained in the message.

    Messages name the file, URL, key or value at fault and, where there is one,
    what to do next. Anything else that escapes a stage is a bug and keeps its
    traceback.

    ``next_step`` is what to do about the whole kind of problem; the stage's
    error output gives it on a second line unless the message already ends
    with its own advice.
    """

    next_step: str = ""
