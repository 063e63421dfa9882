"""The one exception type for bad configuration."""

from typing import Optional, Sequence


class ConfigError(ValueError):
    """A configuration that cannot be loaded or cannot run.

    ``problems`` holds one line per problem, so callers and tests can read them one by one; the message lists them
    all, so a user fixes everything in one go instead of one error per launch.
    """

    def __init__(self, message: str, problems: Optional[Sequence[str]] = None) -> None:
        self.problems = list(problems) if problems is not None else [message]
        super().__init__(message)

    @classmethod
    def from_problems(cls, problems: Sequence[str]) -> "ConfigError":
        header = f"invalid configuration ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"
        return cls("\n".join([header, *(f"  - {p}" for p in problems)]), problems)
