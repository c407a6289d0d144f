#!/usr/bin/env bash
# Build the documentation site (mkdocs.yml, docs/) with every warning an error, into a
# temporary directory (or $1). Installs the `docs` extra first if MkDocs is missing, the way
# scripts/setup.sh installs extras: an installed torch is kept. The guides' snippets are run by
# tests/test_docs.py; this checks that the site builds: every API name's docstring parses,
# every link and cross-reference resolves.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c "import mkdocs, mkdocstrings_handlers.python, material" 2>/dev/null; then
    bash scripts/setup.sh docs
fi
if [ -n "${1:-}" ]; then out=$1; else out=$(mktemp -d); trap 'rm -rf "$out"' EXIT; fi
export NO_MKDOCS_2_WARNING=1  # mkdocs-material's notice about MkDocs 2.0 (not a warning of this site)
"$py" -m mkdocs build --strict --quiet --site-dir "$out"
echo "docs: the site builds with no warning (mkdocs build --strict)"
