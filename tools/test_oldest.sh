#!/usr/bin/env bash
# Run the tests against the oldest transformers, lightning and peft that pyproject.toml allows (the
# libraries whose APIs sam3-train leans on most), without changing the environment:
#
#   tools/test_oldest.sh                                # the fast lane: pytest -m "not slow"
#   tools/test_oldest.sh tests/test_lora.py -x          # pytest arguments replace -m "not slow"
#   PYTHON=/path/to/python TARGET=/tmp/oldest tools/test_oldest.sh
#
# How: pip resolves the three at their lower bounds against this environment with --dry-run (nothing
# is installed there) and reports what it would change; those exact versions go into a --target folder
# (TARGET, default /tmp/sam3_oldest) that comes first on PYTHONPATH. A package that the installed
# versions require and the oldest do not would be missing from a fresh install of the oldest (kernels:
# transformers >= 5.24 requires it, and older transformers import whatever kernels they find and fail
# on the newer ones' API), so it is hidden behind a module that raises ImportError.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TARGET=${TARGET:-/tmp/sam3_oldest}
PACKAGES="transformers lightning peft"

rm -rf "$TARGET"
mkdir -p "$TARGET/hidden"
"$PYTHON" - "$TARGET" $PACKAGES <<'EOF'
import json, re, subprocess, sys, tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

target, names = Path(sys.argv[1]), sys.argv[2:]
declared = tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]
pins = []
for name in names:
    spec = next(Requirement(d) for d in declared if canonicalize_name(Requirement(d).name) == name)
    floor = next((s.version for s in spec.specifier if s.operator == ">="), None)
    if floor is None:
        sys.exit(f"test_oldest: pyproject.toml declares no lower bound for {name} ({spec})")
    pins.append(f"{name}=={floor}")
report = target / "report.json"
subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), *pins],
               check=True)
install = {canonicalize_name(i["metadata"]["name"]): i for i in json.loads(report.read_text())["install"]}
subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                *(f"{n}=={i['metadata']['version']}" for n, i in install.items())], check=True)


def needs(requires) -> set[str]:
    """Names a distribution requires outside any extra."""
    out = set()
    for line in requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.add(canonicalize_name(req.name))
    return out


oldest = set().union(*(needs(i["metadata"].get("requires_dist")) for i in install.values()))
current = set().union(*(needs(metadata.requires(n)) for n in names))
others = set().union(*(needs(d.requires) for d in metadata.distributions()
                       if canonicalize_name(d.metadata["Name"]) not in {*names, *install}))
for name in sorted(current - oldest - others - set(install)):
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        continue
    top = (dist.read_text("top_level.txt") or "").split() or sorted(
        {f.parts[0].removesuffix(".py") for f in dist.files or [] if f.suffix == ".py" and ".dist-info" not in f.parts[0]})
    for module in top:
        (target / "hidden" / f"{module}.py").write_text(
            f'raise ImportError("{module} hidden by tools/test_oldest.sh: the oldest versions do not require {name}")\n')
    print(f"test_oldest: hiding {name} ({', '.join(top)}): only the installed versions require it")
print("test_oldest: installed into", target, ":", ", ".join(f"{n} {i['metadata']['version']}" for n, i in install.items()))
EOF

export PYTHONPATH="$PWD:$TARGET/hidden:$TARGET${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import transformers as t, lightning as l, peft as p
print('test_oldest: testing transformers', t.__version__, '| lightning', l.__version__, '| peft', p.__version__)"
if [ $# -eq 0 ]; then
  set -- -m "not slow"
fi
exec "$PYTHON" -m pytest -q -p no:cacheprovider "$@"
