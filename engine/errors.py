"""The user-facing error type, at the bottom of the import graph (this module imports nothing).

`ConfigError` means: the run as requested cannot start because of something the user wrote
(a YAML file, an `a.b=c` override, a preset name). Its message is meant for the user, names the
field, what was expected and what was found, and is printed without a traceback. Everything
else -- a bug, a failed collective, a missing file the code itself chose -- is a different type.

It lives here rather than in engine/config.py so that any layer (the model presets, data,
parallel) can raise it without importing the configuration module, which itself reads the
model presets: `engine.config.ConfigError` is the same class, re-exported.
"""


class ConfigError(ValueError):
    """A configuration problem, with a message meant for the user."""
