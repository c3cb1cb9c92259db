"""Fills the ${PLACEHOLDERS} of an ECS template (task-definition.json, service.json) from the environment.

Usage: python3 deploy/ecs/render.py deploy/ecs/task-definition.json > task-definition.rendered.json

Only ${UPPER_CASE} names are placeholders: shell expressions such as ${PORT:-8000} in the health check are left as
they are (envsubst would need the list of names to do the same). A placeholder with no value is an error, and the
result must be valid JSON, so a half-filled definition never reaches `aws ecs register-task-definition`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


class MissingValues(KeyError):
    """Placeholders that the environment does not fill."""


def placeholders(template: str) -> set[str]:
    return set(PLACEHOLDER.findall(template))


def render(template: str, values: Mapping[str, str]) -> str:
    missing = sorted(name for name in placeholders(template) if not values.get(name))
    if missing:
        raise MissingValues(", ".join(missing))
    # Values go into JSON strings: escape them as JSON would (a quote or backslash cannot break the document).
    rendered = PLACEHOLDER.sub(lambda match: json.dumps(values[match.group(1)])[1:-1], template)
    json.loads(rendered)
    return rendered


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    template = Path(argv[1]).read_text(encoding="utf-8")
    try:
        sys.stdout.write(render(template, os.environ))
    except MissingValues as error:
        print(f"render: set these environment variables: {error.args[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
