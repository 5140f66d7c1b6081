"""The command lines' parser: argparse, with mistakes answered in one line.

argparse answers a mistyped flag with the whole usage (14 lines for infer) and no hint. Here an
error is one line naming what was wrong, with the closest option when a flag is mistyped
(`--fidelty` → did you mean --fidelity?), and where to look for the rest (--help)."""

from __future__ import annotations

import argparse
import difflib
import sys


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line with a suggestion (module doc)."""

    def options(self) -> list[str]:
        return [o for a in self._actions for o in a.option_strings if o.startswith("--")]

    def suggest(self, flag: str) -> str | None:
        """The option closest to a mistyped `flag` (the part before any `=`), or None."""
        close = difflib.get_close_matches(flag.split("=", 1)[0], self.options(), n=1, cutoff=0.75)
        return close[0] if close else None

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)  # for error(): flags argparse did not reach
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        known = set(self.options())
        unknown = [t for t in getattr(self, "_given", []) if t.startswith("--") and t.split("=", 1)[0] not in known
                   and not any(o.startswith(t.split("=", 1)[0]) for o in known)]  # argparse takes prefixes
        if unknown and message.startswith("the following arguments are required"):  # after a mistyped --ouput
            message = prefix + " ".join(unknown)
        if message.startswith(prefix):
            parts = []
            for token in message[len(prefix):].split():
                if not token.startswith("-"):
                    continue  # a value of the unknown flag, or a stray word: named below
                near = self.suggest(token)
                parts.append(f"unknown option {token.split('=', 1)[0]}" + (f" (did you mean {near}?)" if near else ""))
            message = "; ".join(parts) or f"unexpected {message[len(prefix):]}"
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")
