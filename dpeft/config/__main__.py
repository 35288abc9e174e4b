"""``python -m dpeft.config``: print the config reference (markdown), families' options included."""

from dpeft.validate import reference_markdown

print(reference_markdown())
