"""Errors a user can cause (bad files, fields, values). `main` prints them without a traceback."""


class UserError(ValueError):
  """Something in the user's data or config is wrong; the message names the file or field."""


class DataError(UserError):
  """An input file or table is unreadable, malformed, or has values we cannot use."""


class ConfigError(UserError):
  """A config field has a value we cannot use."""
