"""Report which newest releases loopfit's version caps keep out: `make bounds` (then it runs `make test-latest`).

For each capped dependency in pyproject.toml (and the Makefile's TORCH_RANGE) it asks pip for the newest release
(`pip index versions`, the ordinary client) and prints one line: allowed, or kept out by the cap. huggingface_hub
is reported too: it is not capped by loopfit, but transformers and datasets must agree on it, so a transformers
cap raised alone can still resolve to an older transformers. Exit status 1 when a cap keeps a release out.
"""

import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def capped_requirements():
    """{name: SpecifierSet} of pyproject.toml's dependencies and extras with an upper bound, and TORCH_RANGE."""
    text = (ROOT / "pyproject.toml").read_text()
    found = {}
    for spec in re.findall(r'"([A-Za-z0-9_.\-\[\]]+\s*[<>=!~][^"]*)"', text):
        try:
            req = Requirement(spec)
        except ValueError:
            continue
        if any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier):
            found[req.name] = req.specifier
    torch = re.search(r"^TORCH_RANGE\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    if torch:
        found["torch"] = Requirement(torch.group(1)).specifier
    return found


def newest(name):
    """The newest release of `name` pip can see, or None."""
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True)
    match = re.search(r"\((\S+)\)", proc.stdout)
    return Version(match.group(1)) if match else None


def main():
    kept_out = 0
    checks = {**capped_requirements(), "huggingface-hub": SpecifierSet()}
    width = max(map(len, checks))
    for name, specifier in sorted(checks.items()):
        latest = newest(name)
        if latest is None:
            print(f"{name:<{width}}  {str(specifier) or '(no cap)':<20} newest: unknown (pip index found none)")
            continue
        allowed = specifier.contains(latest, prereleases=False) if str(specifier) else True
        kept_out += not allowed
        verdict = "allowed" if allowed else "KEPT OUT: raise the cap, with those that must move with it"
        print(f"{name:<{width}}  {str(specifier) or '(no cap)':<20} newest {latest}: {verdict}")
    return 1 if kept_out else 0


if __name__ == "__main__":
    sys.exit(main())
