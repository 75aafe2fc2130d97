"""The one exception type a stage turns into a clear message and exit code 1."""


class PipelineError(Exception):
    """A problem with the user's input, data or environment, explained in the message.

    Messages name the file, URL, key or value at fault and, where there is one,
    what to do next. Anything else that escapes a stage is a bug and keeps its
    traceback.
    """
